//! The scoring layout of a set of decision trees (forest and booster alike), built
//! from their stored flat arrays when a model first scores and never stored itself.
//!
//! The stored form keeps one array per node field (`feat`, `thr`, `left`, `right`):
//! a step of a walk touches four arrays at scattered places and takes a branch the
//! CPU cannot predict. Here a node is one 12-byte record, the two children of a
//! node sit side by side (each tree renumbered breadth first), and a step picks the
//! child with arithmetic, `next = child + !(row[feat] <= thr)`: the same comparison
//! as the stored form, so a row reaches the same leaf (NaN goes right in both).
//!
//! A leaf steps to itself (`thr` NaN, `child` its own index − 1), so every walk of
//! a tree takes the tree's depth in steps with no branch, and several rows walk a
//! tree side by side ([`Walk::each_leaf`]): their steps are independent, so the
//! CPU overlaps them instead of waiting out one chain of loads at a time.
//!
//! A leaf carries a 32-bit payload chosen by the model (the forest: its leaf
//! number; the booster: the bits of its value).

/// `feat` of a leaf in the stored form.
const LEAF: u32 = u32::MAX;

/// Rows that walk a tree side by side.
const LANES: usize = 8;

/// Rows that go through all the trees before the next rows start: 32 rows of the
/// WUSTL model's 174 features are 22 KB, inside a core's L1 data cache. Measured
/// against one pass over the whole batch of 1,024 (each tree walking every row):
/// boosted trees −20 %, forest −10 %, the ensemble 5.5–5.9 → 5.1 ms per batch
/// (benches/RESULTS.md); 16 rows per pass was slower than either.
const PASS_ROWS: usize = 32;

/// One node: the next node is `child` when `row[feat] <= thr`, else `child + 1`
/// (wrapping); a leaf's `thr` is NaN and its `child` is its own index − 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    feat: u32,
    thr: f32,
    child: u32,
}

/// The trees of one model in the scoring layout.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Walk {
    roots: Vec<u32>,
    /// Steps from each tree's root to its deepest leaf.
    depth: Vec<u32>,
    nodes: Vec<Node>,
    /// A leaf's payload, by node (0 for internal nodes).
    payload: Vec<u32>,
}

/// The stored flat form of a set of trees (node `i` internal when
/// `feat[i] != u32::MAX`).
pub(crate) struct Flat<'a> {
    pub roots: &'a [u32],
    pub feat: &'a [u32],
    pub thr: &'a [f32],
    pub left: &'a [u32],
    pub right: &'a [u32],
}

impl Walk {
    /// The scoring layout of `flat`; `payload(i)` is what leaf `i` (a stored node
    /// index) carries.
    pub(crate) fn build(flat: &Flat<'_>, payload: impl Fn(usize) -> u32) -> Walk {
        let n = flat.feat.len();
        let blank = Node { feat: 0, thr: f32::NAN, child: 0 };
        let mut w = Walk { roots: Vec::with_capacity(flat.roots.len()), depth: Vec::with_capacity(flat.roots.len()), nodes: Vec::with_capacity(n), payload: Vec::with_capacity(n) };
        let mut queue = std::collections::VecDeque::new();
        for &root in flat.roots {
            w.roots.push(w.nodes.len() as u32);
            queue.push_back((root as usize, w.nodes.len(), 0u32));
            w.nodes.push(blank);
            w.payload.push(0);
            let mut depth = 0;
            while let Some((old, new, d)) = queue.pop_front() {
                depth = depth.max(d);
                if flat.feat[old] == LEAF {
                    w.nodes[new].child = (new as u32).wrapping_sub(1);
                    w.payload[new] = payload(old);
                } else {
                    let c = w.nodes.len();
                    w.nodes.extend([blank, blank]);
                    w.payload.extend([0, 0]);
                    queue.push_back((flat.left[old] as usize, c, d + 1));
                    queue.push_back((flat.right[old] as usize, c + 1, d + 1));
                    w.nodes[new] = Node { feat: flat.feat[old], thr: flat.thr[old], child: c as u32 };
                }
            }
            w.depth.push(depth);
        }
        w
    }

    /// How many trees.
    pub(crate) fn trees(&self) -> usize {
        self.roots.len()
    }

    #[inline(always)]
    fn step(&self, n: u32, row: &[f32]) -> u32 {
        let node = self.nodes[n as usize];
        node.child.wrapping_add(u32::from(!(row[node.feat as usize] <= node.thr)))
    }

    /// The payload of the leaf `row` reaches in tree `tree`.
    #[inline]
    pub(crate) fn leaf(&self, tree: usize, row: &[f32]) -> u32 {
        let mut n = self.roots[tree];
        for _ in 0..self.depth[tree] {
            n = self.step(n, row);
        }
        self.payload[n as usize]
    }

    /// `visit(i, payload)` for every tree in order and every row `i` of `rows`
    /// (row-major, `cols` wide), with the payload of the leaf row `i` reaches in that
    /// tree: each row sees the trees in order (so sums over trees keep their bits).
    /// The rows go [`PASS_ROWS`] at a time through all the trees, so a pass's rows
    /// stay in the core's nearest cache while every tree walks them.
    #[inline]
    pub(crate) fn every_leaf(&self, rows: &[f32], cols: usize, mut visit: impl FnMut(usize, u32)) {
        for (c, chunk) in rows.chunks(PASS_ROWS * cols.max(1)).enumerate() {
            for tree in 0..self.trees() {
                self.each_leaf(tree, chunk, cols, |i, leaf| visit(c * PASS_ROWS + i, leaf));
            }
        }
    }

    /// `visit(i, payload)` for each row `i` of `rows` (row-major, `cols` wide) in
    /// order, with the payload of the leaf it reaches in tree `tree`; rows walk
    /// the tree [`LANES`] at a time.
    #[inline]
    pub(crate) fn each_leaf(&self, tree: usize, rows: &[f32], cols: usize, mut visit: impl FnMut(usize, u32)) {
        if rows.is_empty() {
            return;
        }
        let (root, depth) = (self.roots[tree], self.depth[tree]);
        let block = LANES * cols;
        let mut chunks = rows.chunks_exact(block);
        let mut first = 0;
        for chunk in &mut chunks {
            let lane: [&[f32]; LANES] = std::array::from_fn(|l| &chunk[l * cols..(l + 1) * cols]);
            let mut n = [root; LANES];
            for _ in 0..depth {
                for l in 0..LANES {
                    n[l] = self.step(n[l], lane[l]);
                }
            }
            for (l, &n) in n.iter().enumerate() {
                visit(first + l, self.payload[n as usize]);
            }
            first += LANES;
        }
        for (i, row) in chunks.remainder().chunks_exact(cols).enumerate() {
            visit(first + i, self.leaf(tree, row));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random tree in the stored form, nodes in depth-first order.
    fn grow(rng: &mut rand::rngs::StdRng, depth: usize, cols: usize, f: &mut Vec<u32>, t: &mut Vec<f32>, l: &mut Vec<u32>, r: &mut Vec<u32>) -> u32 {
        let me = f.len();
        f.push(LEAF);
        t.push(0.0);
        l.push(me as u32);
        r.push(0);
        if depth > 0 && rng.random_bool(0.8) {
            f[me] = rng.random_range(0..cols as u32);
            t[me] = rng.random_range(-1.0..1.0);
            l[me] = grow(rng, depth - 1, cols, f, t, l, r);
            r[me] = grow(rng, depth - 1, cols, f, t, l, r);
        }
        me as u32
    }

    #[test]
    fn reaches_the_leaf_the_stored_form_reaches() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut f, mut t, mut l, mut r, mut roots) = (vec![], vec![], vec![], vec![], vec![]);
        // A root that is a leaf, at node 0 (its self-step wraps around).
        roots.push(grow(&mut rng, 0, 5, &mut f, &mut t, &mut l, &mut r));
        for _ in 0..20 {
            roots.push(grow(&mut rng, 9, 5, &mut f, &mut t, &mut l, &mut r));
        }
        let flat = Flat { roots: &roots, feat: &f, thr: &t, left: &l, right: &r };
        let walk = Walk::build(&flat, |n| n as u32);
        assert_eq!(walk.nodes.len(), f.len());
        let mut rows = Vec::new();
        for i in 0..2003 {
            let row: Vec<f32> = (0..5)
                .map(|c| match (i + c) % 11 {
                    0 => f32::NAN,
                    1 => t[rng.random_range(0..t.len())], // exactly on a threshold
                    _ => rng.random_range(-1.2..1.2),
                })
                .collect();
            for (tree, &old) in roots.iter().enumerate() {
                let mut n = old as usize;
                while f[n] != LEAF {
                    n = if row[f[n] as usize] <= t[n] { l[n] } else { r[n] } as usize;
                }
                assert_eq!(walk.leaf(tree, &row), n as u32);
            }
            rows.extend(row);
        }
        // Side by side (LANES at a time, then the rest one by one): the same leaves.
        for (tree, &old) in roots.iter().enumerate() {
            let mut seen = 0;
            walk.each_leaf(tree, &rows, 5, |i, leaf| {
                assert_eq!(i, seen);
                seen += 1;
                assert_eq!(leaf, walk.leaf(tree, &rows[i * 5..(i + 1) * 5]), "tree {tree} (stored root {old}), row {i}");
            });
            assert_eq!(seen, 2003);
        }
        // Through all the trees a pass of rows at a time: every (tree, row) once, and
        // each row meets the trees in order.
        let mut next_tree = vec![0usize; 2003];
        walk.every_leaf(&rows, 5, |i, leaf| {
            let tree = next_tree[i];
            assert_eq!(leaf, walk.leaf(tree, &rows[i * 5..(i + 1) * 5]), "tree {tree}, row {i}");
            next_tree[i] += 1;
        });
        assert!(next_tree.iter().all(|&t| t == roots.len()));
    }
}
