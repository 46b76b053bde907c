//! PNG plots of held-out results: ROC curves, precision-recall curves and the
//! family confusion matrix, from plain series (this module knows no report or job). Text uses the system's DejaVu Sans when present; without
//! it the plots are drawn without labels (the numbers are in `report.json`).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use twinguard_models::metrics;

const FONT_PATHS: [&str; 2] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// Register a font once; true when text can be drawn.
fn font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

const COLORS: [RGBColor; 5] = [RGBColor(0, 0, 0), RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Lowest false-positive rate a log-scale ROC axis shows (an FPR of 0 is drawn here).
const LOG_FPR_MIN: f64 = 1e-4;

fn curves(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)], log_x: bool) -> PlotResult {
    let text = font();
    let root = BitMapBackend::new(path, (800, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption(title, ("sans-serif", 24)).x_label_area_size(45).y_label_area_size(55);
    }
    if log_x {
        // Operators live at 0.1-5 % false positives: a log axis shows that region.
        let chart = b.build_cartesian_2d((LOG_FPR_MIN..1f64).log_scale(), 0f64..1.0001f64)?;
        let clamped: Vec<(String, Vec<(f64, f64)>)> =
            series.iter().map(|(n, pts)| (n.clone(), pts.iter().map(|&(x, y)| (x.max(LOG_FPR_MIN), y)).collect())).collect();
        lines(chart, &clamped, text, x_label, y_label)?;
    } else {
        lines(b.build_cartesian_2d(0f64..1f64, 0f64..1.0001f64)?, series, text, x_label, y_label)?;
    }
    root.present()?;
    Ok(())
}

fn lines<'a, X>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    series: &[(String, Vec<(f64, f64)>)],
    text: bool,
    x_label: &str,
    y_label: &str,
) -> PlotResult
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x_label).y_desc(y_label);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let s = chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?;
        if text {
            s.label(name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
    }
    if text {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    Ok(())
}

fn confusion(path: &Path, mc: &metrics::MultiClass) -> PlotResult {
    let text = font();
    let k = mc.classes.len().max(1);
    let root = BitMapBackend::new(path, (900, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if text {
        b.caption("Confusion matrix (rows: truth, columns: verdict), row-normalised", ("sans-serif", 20))
            .x_label_area_size(120)
            .y_label_area_size(160);
    }
    let mut chart = b.build_cartesian_2d(0..k, 0..k)?;
    if text {
        let names = mc.classes.clone();
        let names2 = mc.classes.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(k)
            .y_labels(k)
            .x_label_formatter(&move |i| names.get(*i).cloned().unwrap_or_default())
            .y_label_formatter(&move |i| (k - 1).checked_sub(*i).and_then(|j| names2.get(j)).cloned().unwrap_or_default())
            .x_label_style(("sans-serif", 12).into_font().transform(FontTransform::Rotate90))
            .y_label_style(("sans-serif", 12))
            .draw()?;
    }
    for (t, row) in mc.confusion.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        for (p, &n) in row.iter().enumerate() {
            let share = n as f64 / total as f64;
            let shade = (255.0 * (1.0 - share)) as u8;
            let y = k - 1 - t;
            chart.draw_series(std::iter::once(Rectangle::new([(p, y), (p + 1, y + 1)], RGBColor(shade, shade, 255).filled())))?;
            if text {
                chart.draw_series(std::iter::once(Text::new(format!("{n}"), (p, y + 1), ("sans-serif", 14))))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// One model's held-out scores, with its AUCs for the legend.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub name: &'a str,
    pub scores: &'a [f64],
    pub roc_auc: f64,
    pub pr_auc: f64,
}

/// Write `roc.png`, `pr.png` and `confusion.png` into `dir`: a curve per series
/// against `truth` (attack or not, per test row), and the `confusion` matrix.
pub fn write_all(dir: &Path, series: &[Series<'_>], truth: &[bool], confusion_matrix: &metrics::MultiClass) -> PlotResult {
    let y = truth;
    let roc: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|m| (format!("{} (AUC {:.3})", m.name, m.roc_auc), metrics::roc_curve(m.scores, y, 400)))
        .collect();
    curves(&dir.join("roc.png"), "ROC, held-out test rows", "false-positive rate (log scale)", "detection rate", &roc, true)?;
    let pr: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|m| (format!("{} (AP {:.3})", m.name, m.pr_auc), metrics::pr_curve(m.scores, y, 400)))
        .collect();
    curves(&dir.join("pr.png"), "Precision-recall, held-out test rows", "recall", "precision", &pr, false)?;
    confusion(&dir.join("confusion.png"), confusion_matrix)?;
    Ok(())
}
