"""CICIoMT2024 sample: binary DR@FPR and 6/19-class macro-F1, stratified 60/20/20 split."""
import sys, time
import numpy as np, pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.ensemble import RandomForestClassifier, HistGradientBoostingClassifier, ExtraTreesClassifier
from sklearn.svm import SVC
from sklearn.preprocessing import StandardScaler
from sklearn.metrics import f1_score, roc_auc_score, confusion_matrix

T0 = time.time()
pd.set_option('display.width', 250); pd.set_option('display.max_columns', 50)
d = pd.read_csv('../../shared/datasets/ciciomt2024/train_sample.csv.gz')
FEAT = [c for c in d.columns if c != 'attack_type']


def lab19(s):
    s = s.replace('WiFi_and_MQTT_test_', '').replace('_test.pcap', '').replace('TCP_IP-', '')
    for a, b in (('ICMP1', 'ICMP'), ('ICMP2', 'ICMP'), ('UDP1', 'UDP'), ('UDP2', 'UDP')):
        s = s.replace(a, b)
    return s


def lab6(s19):
    if s19 == 'Benign': return 'Benign'
    if s19.startswith('MQTT'): return 'MQTT'
    if s19.startswith('Recon'): return 'Recon'
    if s19.startswith('ARP'): return 'Spoofing'
    if s19.startswith('DDoS'): return 'DDoS'
    if s19.startswith('DoS'): return 'DoS'
    raise ValueError(s19)


d['y19'] = d.attack_type.map(lab19); d['y6'] = d.y19.map(lab6)
print('19-class counts (raw):\n', d.y19.value_counts().to_string())
print('6-class counts (raw):\n', d.y6.value_counts().to_string())
print('inf Rate rows per 6-class:', d[np.isinf(d.Rate)].y6.value_counts().to_dict())
ndup_full = d.duplicated(FEAT + ['y19']).sum(); ndup_feat = d.duplicated(FEAT).sum()
print(f'exact duplicate rows (features+label19): {ndup_full}; duplicate feature vectors: {ndup_feat}')
conf = d.drop_duplicates(FEAT + ['y19'])
conf = conf[conf.duplicated(FEAT, keep=False)]
print('feature vectors shared by >1 label19, rows per 6-class:', conf.y6.value_counts().to_dict())
print('dup rows per 6-class:', d[d.duplicated(FEAT)].y6.value_counts().to_dict())
# dedupe on FEATURES before splitting: no identical vector can straddle train/test
d = d.drop_duplicates(FEAT, keep='first').reset_index(drop=True)
print('after dedupe:', len(d), d.y6.value_counts().to_dict())


def prep(df, log=False, drop=()):
    X = df[FEAT].copy().astype(float)
    X['Rate_inf'] = np.isinf(X.Rate).astype(float)
    X['Rate'] = X.Rate.replace([np.inf, -np.inf], np.nan).fillna(1e7)  # cap: larger than any finite
    X = X.drop(columns=[c for c in drop]).fillna(0.0)
    if log:
        for c in X.columns:
            if X[c].min() >= 0 and X[c].max() > 10:
                X[c] = np.log1p(X[c])
    return X


idx = np.arange(len(d))
i_tr, i_tmp = train_test_split(idx, test_size=0.4, stratify=d.y19, random_state=42)
i_va, i_te = train_test_split(i_tmp, test_size=0.5, stratify=d.y19.values[i_tmp], random_state=42)
print('split sizes', len(i_tr), len(i_va), len(i_te))
yb = (d.y6 != 'Benign').values.astype(int)
y19 = d.y19.values; y6 = d.y6.values
arp = pd.read_csv('../../shared/datasets/ciciomt2024/ARP_Spoofing_train.pcap.csv')
arp['y19'] = 'ARP_Spoofing'; arp['y6'] = 'Spoofing'; arp['attack_type'] = 'ARP_train'
arp = arp.drop_duplicates(FEAT)
rows = []


def report(name, score, pred6=None, pred19=None):
    sv, st = score[i_va], score[i_te]
    r = dict(model=name, AUC=round(roc_auc_score(yb[i_te], st), 4))
    for f in (0.005, 0.01):
        thr = np.quantile(sv[yb[i_va] == 0], 1 - f)
        p = st > thr
        r[f'DR@{f}'] = round(p[yb[i_te] == 1].mean(), 4); r[f'FPR@{f}'] = round(p[yb[i_te] == 0].mean(), 4)
        if f == 0.01:
            miss = pd.Series(y19[i_te][(yb[i_te] == 1) & ~p]).value_counts()
            r['missed_attacks@1%'] = miss.head(4).to_dict()
    if pred6 is not None:
        r['F1m6'] = round(f1_score(y6[i_te], pred6, average='macro'), 4)
    if pred19 is not None:
        r['F1m19'] = round(f1_score(y19[i_te], pred19, average='macro'), 4)
    rows.append(r); print(r, f'{time.time()-T0:.0f}s', flush=True)


def to6(p19): return np.array([lab6(s) for s in p19])


only = sys.argv[1:]
configs = only or ['rf_bin', 'rf_bin_bal', 'rf19', 'rf19_big', 'rf6', 'hgb19', 'hgb6', 'svm', 'et19', 'rf19_noIAT', 'rf19_arp']
X = prep(d); XL = prep(d, log=True)
for cfg in configs:
    if cfg == 'rf_bin':
        m = RandomForestClassifier(100, n_jobs=1, random_state=0).fit(X.values[i_tr], yb[i_tr])
        report('RF100 binary (reference)', m.predict_proba(X.values)[:, 1])
    elif cfg == 'rf_bin_bal':
        m = RandomForestClassifier(300, n_jobs=1, random_state=0, class_weight='balanced', min_samples_leaf=1).fit(X.values[i_tr], yb[i_tr])
        report('RF300 binary balanced', m.predict_proba(X.values)[:, 1])
    elif cfg in ('rf19', 'rf19_big', 'rf19_noIAT', 'rf19_arp'):
        Xc = prep(d, drop=['IAT']) if cfg == 'rf19_noIAT' else X
        Xtr, ytr = Xc.values[i_tr], y19[i_tr]
        if cfg == 'rf19_arp':
            Xtr = np.vstack([Xtr, prep(arp).values]); ytr = np.concatenate([ytr, arp.y19.values])
        n = 300 if cfg == 'rf19_big' else 200
        m = RandomForestClassifier(n, n_jobs=1, random_state=0,
                                   class_weight='balanced' if cfg == 'rf19_big' else None).fit(Xtr, ytr)
        P = m.predict_proba(Xc.values); kb = list(m.classes_).index('Benign')
        p19 = m.classes_[P.argmax(1)]
        report(f'RF{n} 19-class, score=1-P(Benign) [{cfg}]', 1 - P[:, kb], to6(p19[i_te]), p19[i_te])
        if cfg == 'rf19':
            imp = sorted(zip(Xc.columns, m.feature_importances_), key=lambda t: -t[1])
            print('RF19 importances:', [(a, round(b, 3)) for a, b in imp[:15]])
            cm = pd.crosstab(pd.Series(y6[i_te], name='true'), pd.Series(to6(p19[i_te]), name='pred'))
            print('6-class confusion (argmax):\n', cm.to_string())
            cm19 = pd.crosstab(pd.Series(y19[i_te], name='true'), pd.Series(p19[i_te], name='pred'))
            print('19-class confusion (argmax):\n', cm19.to_string())
            np.save('rf19_P.npy', P)
        if cfg == 'rf19_arp':
            for lab in ('Spoofing',):
                mk = y6[i_te] == lab
                print('Spoofing recall (6-class argmax) with ARP train added:', (to6(p19[i_te])[mk] == lab).mean())
    elif cfg == 'rf6':
        m = RandomForestClassifier(200, n_jobs=1, random_state=0).fit(X.values[i_tr], y6[i_tr])
        P = m.predict_proba(X.values); kb = list(m.classes_).index('Benign')
        report('RF200 6-class, score=1-P(Benign)', 1 - P[:, kb], m.classes_[P.argmax(1)][i_te])
    elif cfg in ('hgb19', 'hgb6'):
        yy = y19 if cfg == 'hgb19' else y6
        m = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, max_leaf_nodes=31,
                                           early_stopping=False, random_state=0).fit(X.values[i_tr], yy[i_tr])
        P = m.predict_proba(X.values); kb = list(m.classes_).index('Benign'); pp = m.classes_[P.argmax(1)][i_te]
        if cfg == 'hgb19':
            report('HGB300 19-class, score=1-P(Benign)', 1 - P[:, kb], to6(pp), pp)
        else:
            report('HGB300 6-class, score=1-P(Benign)', 1 - P[:, kb], pp)
    elif cfg == 'et19':
        m = ExtraTreesClassifier(300, n_jobs=1, random_state=0).fit(X.values[i_tr], y19[i_tr])
        P = m.predict_proba(X.values); kb = list(m.classes_).index('Benign'); pp = m.classes_[P.argmax(1)][i_te]
        report('ExtraTrees300 19-class', 1 - P[:, kb], to6(pp), pp)
    elif cfg == 'svm':
        sc = StandardScaler().fit(XL.values[i_tr]); Xs = np.clip(sc.transform(XL.values), -10, 10)
        rng = np.random.RandomState(0); sub = rng.choice(i_tr, 8000, replace=False)
        m = SVC(C=10, gamma='scale').fit(Xs[sub], yb[sub])
        report('SVM RBF binary (log1p, 8k subsample)', m.decision_function(Xs))
pd.DataFrame(rows).to_csv('cic_results_%s.csv' % ('_'.join(only) if only else 'all'), index=False)
print(pd.DataFrame(rows).drop(columns=['missed_attacks@1%']).to_string())
