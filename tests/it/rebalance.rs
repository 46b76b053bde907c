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

    // b's devices continued from b's state: their event counts span both halves.
    let by = assert_twins_and_verdicts(&cfg, &recs, &coords, &verdicts);
    assert!(by.keys().any(|(p, _)| b_parts.contains(p)));
}

/// The final twins equal an uninterrupted run's, and a re-emitted verdict is an
/// exact repeat; returns the verdicts by input coordinates.
fn assert_twins_and_verdicts(
    cfg: &twinguard::config::Config,
    recs: &[twinguard::tools::sim::SimRecord],
    coords: &[(i32, i64)],
    verdicts: &Reader,
) -> std::collections::HashMap<(i32, i64), Vec<(Vec<u8>, Vec<u8>)>> {
    let expected = reference_twins(cfg, recs, coords);
    let got = changelog_twins(cfg);
    assert_eq!(got.len(), expected.len());
    assert_twins_equal(&expected, &got);
    let by = verdicts_by_coords(&verdicts.records);
    assert!(by.values().all(|c| c.iter().all(|x| x == &c[0])), "duplicates only as exact repeats");
    by
}

/// Per stream worker of a process (`worker{id=N}` in its log), the input
/// partitions it owns now, from its `rebalance` lines (assign adds, revoke removes).
fn worker_partitions(log: &str) -> std::collections::BTreeMap<usize, HashSet<i32>> {
    let mut owned: std::collections::BTreeMap<usize, HashSet<i32>> = Default::default();
    for line in log.lines().filter(|l| l.contains(" rebalance ") && l.contains("partitions=[")) {
        let Some(at) = line.find("worker{id=") else { continue };
        let id: usize = line[at + "worker{id=".len()..].split('}').next().unwrap().parse().unwrap();
        let parts: HashSet<i32> = assigned(line).into_iter().collect();
        let mine = owned.entry(id).or_default();
        if line.contains("assign") {
            mine.extend(parts);
        } else if line.contains("revoke") {
            mine.retain(|p| !parts.contains(p));
        }
    }
    owned
}

/// Wait until `p`'s workers' partitions satisfy `ok`; returns them.
fn wait_workers(p: &PipelineProc, what: &str, ok: impl Fn(&std::collections::BTreeMap<usize, HashSet<i32>>) -> bool) -> std::collections::BTreeMap<usize, HashSet<i32>> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let w = worker_partitions(&p.log_text());
        if ok(&w) {
            return w;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}; workers own {w:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Two instances of two stream workers each (`engine.workers = 2`): four group
/// members split the four partitions; when one instance stops, the other's
/// workers take its partitions over with their twins restored from the changelog,
/// and the final twins equal an uninterrupted single-worker run.
#[test]
fn instances_of_two_workers_split_and_take_over_partitions() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("rebalance-workers");
    cfg.engine.workers = Some(2);
    let recs = sim_records(24, 12_000, 13, 0.0);
    let (first, second) = recs.split_at(6_000);
    let path = write_config(&dir, "pipeline", &cfg);
    let all: HashSet<i32> = (0..4).collect();
    let union = |w: &std::collections::BTreeMap<usize, HashSet<i32>>| w.values().flatten().copied().collect::<HashSet<i32>>();
    let disjoint = |w: &std::collections::BTreeMap<usize, HashSet<i32>>| w.values().map(HashSet::len).sum::<usize>() == union(w).len();

    let mut a = PipelineProc::start(&dir, "a", &path);
    wait_workers(&a, "a's two workers to split the partitions", |w| {
        w.len() == 2 && w.values().all(|s| !s.is_empty()) && union(w) == all && disjoint(w)
    });
    let mut coords = produce(&cfg, first);
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("verdicts for the first half", |r| verdicts_by_coords(r).len() >= first.len());

    let mut b = PipelineProc::start(&dir, "b", &path);
    let b_owned = wait_workers(&b, "b's workers to own partitions", |w| w.len() == 2 && w.values().all(|s| !s.is_empty()));
    let b_parts = union(&b_owned);
    assert!(b_parts.len() < 4, "b owns some partitions, not all: {b_owned:?}");
    let a_owned = wait_workers(&a, "a's workers to own the rest", |w| union(w) == &all - &b_parts && disjoint(w));
    eprintln!("four members: a {a_owned:?}, b {b_owned:?}");

    let mark = a.log_text().len();
    b.stop();
    wait_workers(&a, "a's workers to own all four again", |w| union(w) == all && disjoint(w));
    for p in &b_parts {
        let needle = format!("partition={p} ");
        let restored = || a.log_text()[mark..].lines().find(|l| l.contains("twins restored from changelog") && l.contains(&needle)).map(str::to_string);
        let deadline = std::time::Instant::now() + WAIT;
        let line = loop {
            if let Some(l) = restored() {
                break l;
            }
            assert!(std::time::Instant::now() < deadline, "a never restored partition {p}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(!line.contains(" twins=0 "), "b's twins of partition {p} were restored: {line}");
    }
    coords.extend(produce(&cfg, second));
    verdicts.until("verdicts for everything", |r| verdicts_by_coords(r).len() >= recs.len());
    a.stop();
    assert_twins_and_verdicts(&cfg, &recs, &coords, &verdicts);
}
