# Which features separate Spoofing from normal? + HGB reference on the streaming features
import sys; sys.argv=['x','__none__']
exec(open('wustl.py').read().split("rows = []")[0])
from sklearn.ensemble import HistGradientBoostingClassifier
F = FS['raw+z+d+ew+roll10']
tr = np.arange(n) < i_tr
for lab in ('Spoofing', 'Data Alteration'):
    m = tr & ((cat == 'normal') | (cat == lab))
    aucs = {c: roc_auc_score(cat[m] == lab, F[c].values[m]) for c in F.columns}
    top = sorted(aucs.items(), key=lambda t: -abs(t[1] - 0.5))[:10]
    print(lab, 'univariate train AUC top:', [(a, round(b, 3)) for a, b in top])
rows = []
for fname in ('raw', 'raw+z+d+ew+roll10'):
    Xa = FS[fname].values
    h = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=False, random_state=0,
                                       class_weight='balanced').fit(Xa[:i_tr], y[:i_tr])
    p = h.predict_proba(Xa)[:, 1]
    for sm in ('none', 'ew0.5'):
        evaluate(smooth(p, sm), f'{fname} | HGB300 | {sm}', rows)
print(pd.DataFrame(rows).to_string())
