//! The evaluation report (`report.json`), its text table, the model card's
//! markdown and headline figures: data and text only.

pub use twinguard_models::eval::{ModelReport, Report};
use twinguard_models::Artifact;

/// The report as a plain-text table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "model {}  dataset {}", r.model_version, r.dataset);
    let _ = writeln!(s, "split: {}  rows {:?}  target FPR {}", r.split, r.rows, r.target_fpr);
    let _ = writeln!(s, "{:<9} {:>9} {:>8} {:>9} {:>7} {:>8} {:>7} {:>6} {:>6} {:>6} {:>6}", "model", "DR", "FPR", "precision", "F1", "ROC-AUC", "PR-AUC", "TP", "FP", "TN", "FN");
    for (name, m) in &r.models {
        let b = &m.at_threshold;
        let _ = writeln!(
            s,
            "{name:<9} {:>9.4} {:>8.4} {:>9.4} {:>7.4} {:>8.4} {:>7.4} {:>6} {:>6} {:>6} {:>6}",
            b.detection_rate, b.fpr, b.precision, b.f1, b.roc_auc, b.pr_auc, b.tp, b.fp, b.tn, b.fn_
        );
    }
    if let (Some(c), Some(e)) = (&r.combination, r.models.get("ensemble")) {
        let t = &c.threshold_fpr;
        let how = if c.chosen == "stack" { "stacked members".to_string() } else { combined_by(&c.chosen) };
        let _ = writeln!(
            s,
            "ensemble = {how}; target FPR {:.2} %: test FPR {:.2} % (validation: {} of {} normals above, expected {:.2} %, {:.0} % interval {:.2}-{:.2} %)",
            100.0 * r.target_fpr,
            100.0 * e.at_threshold.fpr,
            t.above,
            t.normals,
            100.0 * t.expected,
            100.0 * t.level,
            100.0 * t.low,
            100.0 * t.high
        );
    }
    let _ = writeln!(s, "detection rate per attack class (ensemble):");
    if let Some(m) = r.models.get("ensemble") {
        for (c, v) in &m.recall_by_class {
            let _ = writeln!(s, "  {c:<32} {v:.4}");
        }
    }
    for (title, mc) in [("fine classes", &r.classes), ("families", &r.families)] {
        let _ = writeln!(s, "{title}: macro-F1 {:.4}, accuracy {:.4}; confusion (rows = truth):", mc.macro_f1, mc.accuracy);
        for (i, row) in mc.confusion.iter().enumerate() {
            let _ = writeln!(s, "  {:<32} {:?}  recall {:.4}", mc.classes[i], row, mc.recall[i]);
        }
    }
    let pos = |n: &str| r.families.classes.iter().position(|c| c == n);
    if let (Some(dos), Some(ddos)) = (pos("DoS"), pos("DDoS")) {
        let cm = &r.families.confusion;
        let _ = writeln!(
            s,
            "DoS vs DDoS: {} of {} DDoS rows called DoS, {} of {} DoS rows called DDoS",
            cm[ddos][dos],
            cm[ddos].iter().sum::<u64>(),
            cm[dos][ddos],
            cm[dos].iter().sum::<u64>()
        );
    }
    if let Some(mc) = &r.families_detected {
        let attacks: Vec<f64> = (1..mc.classes.len()).filter(|&i| mc.confusion[i].iter().sum::<u64>() > 0).map(|i| mc.f1[i]).collect();
        let macro_attacks = attacks.iter().sum::<f64>() / attacks.len().max(1) as f64;
        let _ = writeln!(s, "families among detected attacks: macro-F1 {macro_attacks:.4} over {} families, accuracy {:.4}", attacks.len(), mc.accuracy);
    }
    s
}

/// Per-model headline figures for the model card.
pub(crate) fn summary_json(r: &Report) -> serde_json::Value {
    let models: serde_json::Map<String, serde_json::Value> = r
        .models
        .iter()
        .map(|(k, m)| (k.clone(), serde_json::to_value(&m.at_threshold).expect("serialises")))
        .collect();
    serde_json::json!({
        "models": models,
        "class_macro_f1": r.classes.macro_f1,
        "family_macro_f1": r.families.macro_f1,
        "combination": r.combination,
    })
}

pub(crate) fn model_card_md(a: &Artifact, r: &Report) -> String {
    let c = &a.card;
    format!(
        "# Model card: {ver}\n\n\
         - Event schema: `{schema}`; features: {nf} from the feature SQL stored in `model.json`\n\
         - Dataset: `{ds}` (SHA-256 `{sha}`), {rows} events\n\
         - Split: {split}: {tr} train / {va} validation / {te} test rows\n\
         - Members: random forest, gradient-boosted trees, SVM, LSTM (burn; stepped per event on the device's twin state), twin behavioural score; \
         combined on the validation rows: {combined}\n\
         - Decision threshold {thr:.6} for a target false-positive rate of {fpr} (set on validation normal rows{law})\n\
         {sites}- Label screen: {screen}\n\
         - Trained {created} in {secs:.1} s\n\n\
         ## Held-out test figures (computed by the detector itself)\n\n```\n{table}```\n\n\
         ## Recipe (hyper-parameters)\n\n```json\n{hyper}\n```\n",
        ver = a.version,
        schema = a.schema,
        nf = a.feature_names.len(),
        ds = c.dataset,
        sha = c.dataset_sha256,
        rows = c.rows,
        split = c.split,
        tr = c.train_rows,
        va = c.validation_rows,
        te = c.test_rows,
        thr = c.threshold,
        combined = match &a.ensemble.combination {
            Some(k) if k.chosen == "stack" => "stacked by logistic regression (chosen out of fold over each member alone)".to_string(),
            Some(k) => combined_by(&k.chosen),
            None => "stacked by logistic regression".to_string(),
        },
        law = a.ensemble.combination.as_ref().map_or(String::new(), |k| {
            let t = &k.threshold_fpr;
            format!("; expected FPR on new normal events {:.2} %, {:.0} % interval {:.2}-{:.2} %", 100.0 * t.expected, 100.0 * t.level, 100.0 * t.low, 100.0 * t.high)
        }),
        fpr = c.target_fpr,
        sites = site_thresholds_md(a),
        screen = c.poisoning_screen.as_ref().map_or("not applied".to_string(), |s| s.to_string()),
        created = c.created_utc,
        secs = c.training_seconds,
        table = render(r),
        hyper = serde_json::to_string_pretty(&c.hyper_parameters).unwrap_or_default(),
    )
}

/// A federation's per-site thresholds (`model.site` picks one), as a card line.
fn site_thresholds_md(a: &Artifact) -> String {
    let Some(sites) = a.ensemble.combination.as_ref().map(|k| &k.site_thresholds).filter(|s| !s.is_empty()) else { return String::new() };
    let each: Vec<String> = sites
        .iter()
        .map(|(name, s)| match s.threshold {
            Some(t) => format!("`{name}` {t:.6} ({} of {} normal rows above)", s.fpr.above, s.fpr.normals),
            None => format!("`{name}` the federation's ({} normal rows: too few for its own)", s.fpr.normals),
        })
        .collect();
    format!("- Each site's own threshold (a pipeline's `model.site`), from its own validation rows: {}\n", each.join("; "))
}

/// How a combination other than the stacker scores: "any" member, or one alone.
fn combined_by(chosen: &str) -> String {
    if chosen == "any" {
        "any member, each against its own threshold (--combine any)".to_string()
    } else {
        format!("the {chosen} member alone (stacking did not beat it out of fold)")
    }
}
