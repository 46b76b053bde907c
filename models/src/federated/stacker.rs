//! The stacker, fitted exactly as on the union of the sites' rows: each Newton
//! step is taken on the sum of the sites' gradient and Hessian sums.

use crate::ensemble::{class_weights, MemberScores, NewtonSums, Stacker, MEMBERS};
use crate::ModelError;

/// The stacker fitted by Newton steps on summed per-site sums: `pos` attack rows
/// of `total` (the class weights), `sums(w, class_weights)` the sites' summed
/// gradient and Hessian sums at `w`. Returns it with the step count.
pub fn federated_stacker_with(
    pos: usize,
    total: usize,
    sums: &mut dyn FnMut(&[f64], (f64, f64)) -> Result<NewtonSums, ModelError>,
    l2: f64,
) -> Result<(Stacker, usize), ModelError> {
    if pos == 0 || pos == total {
        return Err(ModelError::Data("the sites' validation rows need both normal and attack rows".into()));
    }
    let cw = class_weights(pos, total);
    let mut w = vec![0.0f64; MEMBERS.len() + 1];
    let mut steps = 0;
    for _ in 0..50 {
        let sum = sums(&w, cw)?;
        steps += 1;
        if Stacker::newton_step(&mut w, sum, l2)? < 1e-8 {
            break;
        }
    }
    Ok((Stacker::from_vector(&w), steps))
}

/// [`federated_stacker_with`] over parts held here (what each site sends per
/// step: gradient and Hessian sums over its validation rows at the current
/// weights, class weights from the total counts). The same fit as
/// [`Stacker::fit`] on the union of the parts.
pub fn federated_stacker(parts: &[(Vec<MemberScores>, Vec<bool>)], l2: f64) -> Result<(Stacker, usize), ModelError> {
    let (pos, total) = parts.iter().fold((0, 0), |(p, t), (_, y)| (p + y.iter().filter(|&&b| b).count(), t + y.len()));
    let mut sums = |w: &[f64], cw: (f64, f64)| {
        let mut sum = NewtonSums::zero();
        for (m, y) in parts {
            sum.add(&Stacker::newton_sums(m, y, w, cw));
        }
        Ok(sum)
    };
    federated_stacker_with(pos, total, &mut sums, l2)
}
