//! Rebalance: two instances in one consumer group split the partitions; when one
//! stops, the other takes its partitions over with their twins restored from the
//! changelog, and the final twins equal an uninterrupted single-instance run.

use std::collections::HashSet;

use twinguard::tools::sim::Truth;

use crate::harness::*;

fn assigned(line: &str) -> Vec<i32> {
    let s = &line[line.find("partitions=[").expect("partitions field") + "partitions=[".len()..];
    let s = &s[..s.find(']').unwrap()];
    s.split(',').filter(|x| !x.trim().is_empty()).map(|x| x.trim().parse().unwrap()).collect()
}

#[test]
fn survivor_takes_over_partitions_with_twins_restored() {
    let Setup { dir, broker: _broker, cfg } = Setup::new("rebalance");
    let recs = sim_records(24, 12_000, 9, 0.0);
    let (first, second) = recs.split_at(6_000);
    let path = write_config(&dir, "pipeline", &cfg);

    let mut a = PipelineProc::start(&dir, "a", &path);
    a.wait_log(&["rebalance", "assign", "partitions=[0, 1, 2, 3]"]);
    let mut b = PipelineProc::start(&dir, "b", &path);
    let b_line = b.wait_log(&["rebalance", "assign", "partitions=["]);
    let b_parts = assigned(&b_line);
    assert!(!b_parts.is_empty() && b_parts.len() < 4, "b owns some partitions: {b_line}");
    let a_parts: Vec<i32> = (0..4).filter(|p| !b_parts.contains(p)).collect();
    a.wait_log(&["rebalance", "assign", &format!("partitions={a_parts:?}")]);

    let mut coords = produce(&cfg, first);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("verdicts for the first half", |r| verdicts_by_coords(r).len() >= first.len());
    b.stop();
    a.wait_log(&["rebalance", "assign", "partitions=[0, 1, 2, 3]"]);
    // a restores b's partitions (and only those: its own twins stayed in memory).
    for p in &b_parts {
        let line = a.wait_log(&["twins restored from changelog", &format!("partition={p} ")]);
        assert!(!line.contains(" twins=0 "), "b's twins of partition {p} were restored: {line}");
    }

    coords.extend(produce(&cfg, second));
    let valid: HashSet<(i32, i64)> =
        recs.iter().zip(&coords).filter(|(r, _)| !matches!(r.truth, Truth::Malformed(_))).map(|(_, c)| *c).collect();
    verdicts.until("verdicts for everything", |r| verdicts_by_coords(r).len() >= valid.len());
    a.stop();

    let expected = reference_twins(&cfg, &recs, &coords);
    let got = changelog_twins(&cfg);
    assert_eq!(got.len(), expected.len());
    assert_twins_equal(&expected, &got);
    // b's devices continued from b's state: their event counts span both halves.
    let by = verdicts_by_coords(&verdicts.records);
    assert!(by.values().all(|c| c.iter().all(|x| x == &c[0])), "duplicates only as exact repeats");
    assert!(by.keys().any(|(p, _)| b_parts.contains(p)));
}
