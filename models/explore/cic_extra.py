import sys; sys.argv=['x','none']
src=open('cic.py').read().split("only = sys.argv[1:]")[0]
exec(src)
X = prep(d)
m = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=False, random_state=0,
                                   class_weight='balanced').fit(X.values[i_tr], yb[i_tr])
report('HGB300 binary balanced', m.predict_proba(X.values)[:, 1])
h6 = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=False, random_state=0).fit(X.values[i_tr], y6[i_tr])
P6 = h6.predict_proba(X.values); kb6 = list(h6.classes_).index('Benign')
P19 = np.load('rf19_P.npy')
rf = RandomForestClassifier(200, n_jobs=1, random_state=0).fit(X.values[i_tr], y19[i_tr]); kb = list(rf.classes_).index('Benign')
s = 0.5 * (1 - P6[:, kb6]) + 0.5 * (1 - P19[:, kb])
report('avg(HGB6, RF19) score', s)
pp = h6.classes_[P6.argmax(1)][i_te]
print('HGB6 per-class recall:', {c: round((pp[y6[i_te]==c]==c).mean(),3) for c in h6.classes_})
print(pd.crosstab(pd.Series(y6[i_te],name='true'), pd.Series(pp,name='pred')).to_string())
