"""WUSTL-EHMS-2020: does the non-identity part of Argus `Flgs` close the gap?

Temporal split 60/20/20 as in the Rust evaluation. Features: the flow and vitals
columns (log scale, vitals forward-filled), their causal z-score against an EW
baseline, delta and deviation from a fast EW mean; plus, in the second run, three
bits of `Flgs` that are flow behaviour, not identity: "R", "s", "*". The `M` flag
(multiple MAC addresses in the flow) is identity-derived and left out. Threshold at
1 % FPR on validation, applied to test. Run: python wustl_flags.py
"""
import os
import numpy as np, pandas as pd
from sklearn.ensemble import RandomForestClassifier
d=pd.read_csv(os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/datasets/wustl-ehms-2020/train.csv'))
EXCL=['SrcAddr','DstAddr','SrcMac','DstMac','Sport','Dport','Packet_num','Attack Category','Label','Dir','Flgs']
VIT=['Temp','SpO2','Pulse_Rate','SYS','DIA','Heart_rate','Resp_Rate','ST']
num=[c for c in d.columns if c not in EXCL and d[c].nunique()>1]
FLOW=[c for c in num if c not in VIT]
y=d['Label'].values; cat=d['Attack Category'].values; n=len(d); a,b=int(.6*n),int(.8*n)
X=pd.DataFrame(index=d.index)
for c in FLOW: X[c]=np.log1p(d[c].clip(lower=0).astype(float))
for c in VIT:
    v=d[c].astype(float).replace(0,np.nan); X[c]=v.ffill().fillna(0)
# causal stream feats
M=X.values; m=M[0].copy(); v=np.zeros(M.shape[1]); s=M[0].copy(); prev=M[0].copy()
Z=np.zeros_like(M); DL=np.zeros_like(M); DV=np.zeros_like(M)
for i in range(n):
    x=M[i]; Z[i]=(x-m)/np.sqrt(v+1e-6); DL[i]=x-prev; DV[i]=x-s
    df=x-m; m=m+.02*df; v=.98*(v+.02*df*df); s=s+.3*(x-s); prev=x
base=np.hstack([M,np.clip(Z,-50,50),DL,DV])
fl=d['Flgs'].astype(str)
R=np.array([[('R' in f), ('s' in f), ('*' in f)] for f in fl],float)
def run(F,name,seed=0):
    clf=RandomForestClassifier(300,min_samples_leaf=1,max_features=.3,n_jobs=1,random_state=seed,class_weight='balanced_subsample')
    clf.fit(F[:a],y[:a]); pv=clf.predict_proba(F[a:b])[:,1]; pt=clf.predict_proba(F[b:])[:,1]
    neg=np.sort(pv[y[a:b]==0]); thr=neg[int(np.ceil(.99*len(neg)))-1]+1e-9
    pred=pt>thr; yt=y[b:]; ct=cat[b:]
    dr=pred[yt==1].mean(); fpr=pred[yt==0].mean(); sp=pred[ct=='Spoofing'].mean()
    print(f"{name}: DR {dr:.3f} FPR {fpr:.4f} spoof {sp:.3f} thr {thr:.3f}")
run(base,'base'); run(np.hstack([base,R]),'base+flags')
run(np.hstack([base,R]),'base+flags s1',1)
