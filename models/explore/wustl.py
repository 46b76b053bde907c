"""WUSTL-EHMS-2020 causal streaming-feature exploration (temporal split 60/20/20)."""
import sys, time, json
import numpy as np, pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC
from sklearn.preprocessing import StandardScaler
from sklearn.metrics import roc_auc_score, f1_score

T0 = time.time()
d = pd.read_csv('../../shared/datasets/wustl-ehms-2020/train.csv')
d.columns = [c.strip() for c in d.columns]
EXCL = ['SrcAddr', 'DstAddr', 'SrcMac', 'DstMac', 'Sport', 'Dport', 'Packet_num',
        'Attack Category', 'Label', 'Dir', 'Flgs']
VIT = ['Temp', 'SpO2', 'Pulse_Rate', 'SYS', 'DIA', 'Heart_rate', 'Resp_Rate', 'ST']
num = [c for c in d.columns if c not in EXCL]
# drop constant columns (no information, same in Rust)
num = [c for c in num if d[c].nunique() > 1]
FLOW = [c for c in num if c not in VIT]
y = d['Label'].values.astype(int)
cat = d['Attack Category'].values
n = len(d)
i_tr, i_va = int(0.6 * n), int(0.8 * n)

# ---- raw transformed values -------------------------------------------------
X = pd.DataFrame(index=d.index)
for c in FLOW:
    X[c] = np.log1p(d[c].clip(lower=0).astype(float))
# vitals: 0 = missing -> causal forward fill of last reading + missing flag
for c in VIT:
    v = d[c].astype(float).replace(0, np.nan)
    X[c + '_miss'] = v.isna().astype(float)
    X[c] = v.ffill().fillna(0.0)
BASE = list(X.columns)
VALS = FLOW + VIT  # columns that get stream features


def stream_feats(M, a_slow=0.02, a_fast=0.3, eps=1e-6):
    """Causal per-device stream features. M: (n, k) array in capture order."""
    n, k = M.shape
    z = np.zeros((n, k)); dl = np.zeros((n, k)); ew = np.zeros((n, k)); dev = np.zeros((n, k))
    m = M[0].copy(); v = np.zeros(k); s = M[0].copy(); prev = M[0].copy()
    for i in range(n):
        x = M[i]
        z[i] = (x - m) / np.sqrt(v + eps)        # vs baseline BEFORE this row
        dl[i] = x - prev
        ew[i] = s                                 # EW mean (alpha .3) of previous rows
        dev[i] = x - s
        # update after scoring
        diff = x - m
        m = m + a_slow * diff
        v = (1 - a_slow) * (v + a_slow * diff * diff)
        s = s + a_fast * (x - s)
        prev = x
    return z, dl, ew, dev


M = X[VALS].values
z, dl, ew, dev = stream_feats(M)
Z = pd.DataFrame(np.clip(z, -50, 50), columns=[c + '_z' for c in VALS])
DL = pd.DataFrame(dl, columns=[c + '_d' for c in VALS])
EW = pd.DataFrame(ew, columns=[c + '_ew3' for c in VALS])
DEV = pd.DataFrame(dev, columns=[c + '_dev3' for c in VALS])
R = pd.DataFrame(index=d.index)
for c in VALS:
    sh = X[c].shift(1)
    R[c + '_rm10'] = sh.rolling(10, min_periods=1).mean()
    R[c + '_rs10'] = sh.rolling(10, min_periods=2).std()
R = R.bfill().fillna(0.0)
# identity-drift binding feature
macs30 = set(d['SrcMac'].iloc[:30])
MACNEW = pd.DataFrame({'mac_new': (~d['SrcMac'].isin(macs30)).astype(float)})

FS = {
    'raw': X[BASE],
    'raw+z': pd.concat([X[BASE], Z], axis=1),
    'raw+z+d+ew': pd.concat([X[BASE], Z, DL, EW, DEV], axis=1),
    'raw+z+d+ew+roll10': pd.concat([X[BASE], Z, DL, EW, DEV, R], axis=1),
}
only = sys.argv[1:] if len(sys.argv) > 1 else None


def smooth(p, kind):
    if kind == 'none':
        return p
    if kind.startswith('ew'):
        a = float(kind[2:]); out = np.empty_like(p); s = p[0]
        for i in range(len(p)):
            s = a * p[i] + (1 - a) * s if i else p[0]
            out[i] = s
        return out
    k = int(kind.lstrip('maxen'))
    sp = pd.Series(p).rolling(k, min_periods=1)
    return (sp.max() if kind.startswith('max') else sp.mean()).values


def evaluate(score, tag, rows):
    sv, st = score[i_tr:i_va], score[i_va:]
    yv, yt = y[i_tr:i_va], y[i_va:]
    ct = cat[i_va:]
    auc = roc_auc_score(yt, st)
    for fpr_t in (0.005, 0.01):
        thr = np.quantile(sv[yv == 0], 1 - fpr_t)
        pred = st > thr
        dr = pred[yt == 1].mean(); fpr = pred[yt == 0].mean()
        vdr = (sv > thr)[yv == 1].mean()
        rows.append(dict(tag=tag, target_fpr=fpr_t, val_DR=round(vdr, 3), test_DR=round(dr, 3),
                         test_FPR=round(fpr, 4), F1=round(f1_score(yt, pred), 3), AUC=round(auc, 4),
                         DR_spoof=round(pred[ct == 'Spoofing'].mean(), 3),
                         DR_alter=round(pred[ct == 'Data Alteration'].mean(), 3)))


rows = []
imp_out = {}
SMOOTH = ['none', 'ew0.3', 'ew0.5', 'max3', 'mean3', 'mean5']
variants = [(k, v, False) for k, v in FS.items()] + \
           [('raw+z+d+ew+mac_new', pd.concat([FS['raw+z+d+ew'], MACNEW], axis=1), True),
            ('mac_new only', MACNEW, True)]
for fname, F, _ in variants:
    if only and fname not in only:
        continue
    Xa = F.values.astype(float)
    Xtr, ytr = Xa[:i_tr], y[:i_tr]
    probs = {}
    rf = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, n_jobs=1, random_state=0,
                                class_weight='balanced_subsample')
    rf.fit(Xtr, ytr); probs['RF200'] = rf.predict_proba(Xa)[:, 1]
    imp_out[fname] = sorted(zip(F.columns, rf.feature_importances_), key=lambda t: -t[1])[:15]
    if fname != 'mac_new only':
        sc = StandardScaler().fit(Xtr); Xs = np.clip(sc.transform(Xa), -10, 10)
        lr = LogisticRegression(C=1.0, max_iter=2000, class_weight='balanced').fit(Xs[:i_tr], ytr)
        probs['LR'] = lr.predict_proba(Xs)[:, 1]
        rng = np.random.RandomState(0); sub = rng.choice(i_tr, min(i_tr, 4000), replace=False)
        svm = SVC(C=3.0, gamma='scale', class_weight='balanced').fit(Xs[sub], ytr[sub])
        df = svm.decision_function(Xs); probs['SVM'] = 1 / (1 + np.exp(-df))
        # fixed (unfitted) stack: mean of ranks-free probabilities RF+LR(+SVM)
        probs['avg(RF,LR,SVM)'] = (probs['RF200'] + probs['LR'] + probs['SVM']) / 3
        probs['avg(RF,LR)'] = (probs['RF200'] + probs['LR']) / 2
    for mname, p in probs.items():
        for sm in SMOOTH:
            evaluate(smooth(p, sm), f'{fname} | {mname} | {sm}', rows)
    print(f'{fname} done {time.time()-T0:.0f}s', flush=True)

res = pd.DataFrame(rows)
res.to_csv('wustl_results%s.csv' % ('_' + '_'.join(only).replace(' ', '') if only else ''), index=False)
pd.set_option('display.width', 250); pd.set_option('display.max_rows', 1000)
print(res[res.target_fpr == 0.01].sort_values('val_DR', ascending=False).head(30).to_string())
print(res[res.target_fpr == 0.005].sort_values('val_DR', ascending=False).head(15).to_string())
for k, v in imp_out.items():
    print(k, [(a, round(b, 3)) for a, b in v])
