//! Each op against finite differences and against its reference built from primitive ops.

use super::dropout::dropout_mask;
use super::*;
use candle_core::{Device, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(rng: &mut StdRng, shape: &[usize], scale: f32) -> Vec<f32> {
    (0..shape.iter().product::<usize>()).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let (a, b) =
        (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

/// Central finite differences of `sum(f(inputs) * r)` against the op's backward, for
/// every element of every input that has a gradient.
fn check_grads(inputs: &[Var], f: &dyn Fn(&[Tensor]) -> Result<Tensor>, tol: f32) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let r = Tensor::from_vec(random(&mut rng, out.dims(), 1.0), out.shape(), out.device()).unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-2f32;
    for (k, var) in inputs.iter().enumerate() {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..base.len() {
            let loss_at = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[i] += delta;
                let mut ts = ts.clone();
                ts[k] = Tensor::from_vec(v, var.shape(), var.device()).unwrap();
                let y = f(&ts).unwrap().to_dtype(DType::F64).unwrap();
                (y * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = ((loss_at(h) - loss_at(-h)) / (2.0 * h as f64)) as f32;
            assert!(
                (numeric - analytic[i]).abs() <= tol * (1.0 + numeric.abs()),
                "input {k} element {i}: finite difference {numeric}, backward {}",
                analytic[i]
            );
        }
    }
}

fn var(rng: &mut StdRng, shape: &[usize], scale: f32) -> Var {
    Var::from_vec(random(rng, shape, scale), shape, &Device::Cpu).unwrap()
}

#[test]
fn layer_norm_matches_reference_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(1);
    let (x, w, b) = (var(&mut rng, &[2, 3, 8], 2.0), var(&mut rng, &[8], 1.5), var(&mut rng, &[8], 1.0));
    let fused = |t: &[Tensor]| layer_norm(Kernels::Fused, &t[0], &t[1], &t[2], 1e-5);
    check_grads(&[x.clone(), w.clone(), b.clone()], &fused, 2e-2);
    let (xs, ws, bs) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    let ours = layer_norm(Kernels::Fused, xs, ws, bs, 1e-5).unwrap();
    let want = reference::layer_norm(xs, ws, bs, 1e-5).unwrap();
    close(&ours, &want, 1e-5);
    let r = Tensor::from_vec(random(&mut rng, &[2, 3, 8], 1.0), (2, 3, 8), &Device::Cpu).unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for t in [xs, ws, bs] {
        close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
    }
}

/// A residual connection's norm in one pass gives the bits of the add and the norm one after
/// the other (odd widths, rows over several chunks); with a gradient to compute, the same values
/// and a gradient for every input.
#[test]
fn add_layer_norm_is_the_add_then_the_norm() {
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, d) in [(3, 8), (5, 37), (300, 384)] {
        let t = |rng: &mut StdRng, n: usize, s: f32| Tensor::from_vec(random(rng, &[n], s), n, &Device::Cpu).unwrap();
        let (a, r) = (
            t(&mut rng, rows * d, 3.0).reshape((rows, d)).unwrap(),
            t(&mut rng, rows * d, 1.0).reshape((rows, d)).unwrap(),
        );
        let (w, b) = (t(&mut rng, d, 1.5), t(&mut rng, d, 1.0));
        let bits = |x: Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
        };
        let one = add_layer_norm(Kernels::Fused, &a, &r, &w, &b, 1e-12).unwrap();
        let two = layer_norm(Kernels::Fused, &(&a + &r).unwrap(), &w, &b, 1e-12).unwrap();
        assert_eq!(bits(one), bits(two), "{rows}x{d}");
    }
    let (a, r) = (var(&mut rng, &[2, 3, 8], 2.0), var(&mut rng, &[2, 3, 8], 1.0));
    let (w, b) = (var(&mut rng, &[8], 1.5), var(&mut rng, &[8], 1.0));
    let ours =
        add_layer_norm(Kernels::Fused, a.as_tensor(), r.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    let want =
        reference::layer_norm(&(a.as_tensor() + r.as_tensor()).unwrap(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    close(&ours, &want, 1e-5);
    let g = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!([&a, &r, &w, &b].iter().all(|v| g.get(v.as_tensor()).is_some()), "every input has a gradient");
}

#[test]
fn gelu_matches_candle_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(3);
    let x = var(&mut rng, &[3, 7], 4.0);
    check_grads(std::slice::from_ref(&x), &|t: &[Tensor]| gelu_erf(Kernels::Fused, &t[0]), 2e-2);
    let ours = gelu_erf(Kernels::Fused, x.as_tensor()).unwrap();
    let want = x.as_tensor().gelu_erf().unwrap();
    close(&ours, &want, 1e-6);
    let g1 = ours.sum_all().unwrap().backward().unwrap();
    let g2 = want.sum_all().unwrap().backward().unwrap();
    close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap(), 1e-5);
}

#[test]
fn linear_matches_reference_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(5);
    let (x, w, b) = (var(&mut rng, &[2, 3, 4], 1.0), var(&mut rng, &[5, 4], 1.0), var(&mut rng, &[5], 1.0));
    check_grads(&[x.clone(), w.clone(), b.clone()], &|t: &[Tensor]| linear(Kernels::Fused, &t[0], &t[1], &t[2]), 1e-2);
    let (xs, ws, bs) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    let ours = linear(Kernels::Fused, xs, ws, bs).unwrap();
    assert_eq!(ours.dims(), [2, 3, 5]);
    let want = reference::linear(xs, ws, bs).unwrap();
    close(&ours, &want, 1e-6);
    let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for t in [xs, ws, bs] {
        close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-5);
    }
}

#[test]
fn dropout_keeps_about_1_minus_p_scales_and_masks_the_gradient() {
    let mut rng = StdRng::seed_from_u64(6);
    let x = Var::from_vec(vec![1f32; 20_000], (100, 200), &Device::Cpu).unwrap();
    let y = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut rng).unwrap();
    let vals = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let kept = vals.iter().filter(|&&v| v != 0.0).count() as f64 / vals.len() as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
    assert!(vals.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    // d(sum y)/dx is the mask itself.
    let g = y.sum_all().unwrap().backward().unwrap();
    let grad = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(grad, vals);
    // Same seed, same mask; another seed, another mask.
    let again = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut StdRng::seed_from_u64(6)).unwrap();
    assert_eq!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
    let other = dropout(Kernels::Fused, x.as_tensor(), 0.25, &mut StdRng::seed_from_u64(7)).unwrap();
    assert_ne!(other.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
}

/// Inputs for attention: 2 sequences of 5 tokens, hidden 8 in 2 heads, the second
/// sequence padded after 3 tokens.
fn attention_inputs(rng: &mut StdRng, nq: usize) -> (Var, Var, Tensor) {
    let q = var(rng, &[2, nq, 8], 1.5);
    let kv = var(rng, &[2, 5, 16], 1.5);
    let mask = Tensor::new(&[[0f32, 0., 0., 0., 0.], [0., 0., 0., -10_000., -10_000.]], &Device::Cpu).unwrap();
    (q, kv, mask)
}

#[test]
fn attention_matches_reference_and_finite_differences() {
    let mut rng = StdRng::seed_from_u64(8);
    for nq in [5, 1] {
        let (q, kv, mask) = attention_inputs(&mut rng, nq);
        let fused = |t: &[Tensor]| attention(Kernels::Fused, &t[0], &t[1], &mask, 2, None);
        check_grads(&[q.clone(), kv.clone()], &fused, 2e-2);
        // With dropout: the same seed gives the fused op and the reference the same mask.
        for p in [0.0f32, 0.3] {
            let mut r1 = StdRng::seed_from_u64(11);
            let ours = attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, Some((p, &mut r1))).unwrap();
            let drop = (p > 0.0).then(|| {
                dropout_mask(&Shape::from((2, 2, nq, 5)), p, &mut StdRng::seed_from_u64(11), &Device::Cpu).unwrap()
            });
            let scale = 1.0 / 2f64;
            let want = reference::attention(q.as_tensor(), kv.as_tensor(), &mask, 2, scale, drop.as_ref()).unwrap();
            close(&ours, &want, 1e-5);
            let r = Tensor::from_vec(random(&mut rng, &[2, nq, 8], 1.0), (2, nq, 8), &Device::Cpu).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for t in [q.as_tensor(), kv.as_tensor()] {
                close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
            }
        }
    }
}

#[test]
fn attention_ignores_padded_keys() {
    let mut rng = StdRng::seed_from_u64(12);
    let (q, kv, mask) = attention_inputs(&mut rng, 5);
    let base = attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, None).unwrap();
    // Change the keys and values of the second sequence's padding: nothing moves.
    let mut vals = kv.as_tensor().to_vec3::<f32>().unwrap();
    for row in &mut vals[1][3..] {
        row.iter_mut().for_each(|v| *v += 5.0);
    }
    let kv2 = Tensor::new(vals, &Device::Cpu).unwrap();
    let moved = attention(Kernels::Fused, q.as_tensor(), &kv2, &mask, 2, None).unwrap();
    close(&moved, &base, 1e-6);
}

#[test]
fn big_inputs_split_across_chunks_agree_with_reference() {
    // More rows than one work item holds, so the chunked reductions are exercised.
    let mut rng = StdRng::seed_from_u64(4);
    let (x, w, b) = (var(&mut rng, &[300, 96], 3.0), var(&mut rng, &[96], 1.0), var(&mut rng, &[96], 1.0));
    let ours = layer_norm(Kernels::Fused, x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    let want = reference::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    close(&ours, &want, 1e-5);
    let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
        close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-3);
    }
    // Softmax rows longer than the reduction lanes, with a partial last chunk, and padding
    // of a different length in each sequence.
    let (q, kv) = (var(&mut rng, &[3, 37, 64], 1.0), var(&mut rng, &[3, 37, 128], 1.0));
    let mask_rows: Vec<f32> = (0..3 * 37).map(|i| if i % 37 > 30 - (i / 37) * 5 { -10_000.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask_rows, (3, 37), &Device::Cpu).unwrap();
    let ours = attention(Kernels::Fused, q.as_tensor(), kv.as_tensor(), &mask, 2, None).unwrap();
    let want = reference::attention(q.as_tensor(), kv.as_tensor(), &mask, 2, 1.0 / 32f64.sqrt(), None).unwrap();
    close(&ours, &want, 1e-5);
    let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for t in [q.as_tensor(), kv.as_tensor()] {
        close(g1.get(t).unwrap(), g2.get(t).unwrap(), 1e-4);
    }
    let x = var(&mut rng, &[70, 1000], 6.0);
    let ours = gelu_erf(Kernels::Fused, x.as_tensor()).unwrap();
    close(&ours, &x.as_tensor().gelu_erf().unwrap(), 1e-6);
}

/// bert.rs's layer op by op: what [`encoder_layer`] must equal.
fn layer_op_by_op(
    k: Kernels,
    p: &LayerParams,
    xs: &Tensor,
    mask: &Tensor,
    nq: usize,
    mut rng: Option<&mut StdRng>,
) -> Result<Tensor> {
    let xq = xs.narrow(1, 0, nq)?;
    let q = linear(k, &xq, p.query[0], p.query[1])?;
    let (wkv, bkv) = (Tensor::cat(&[p.key[0], p.value[0]], 0)?, Tensor::cat(&[p.key[1], p.value[1]], 0)?);
    let kv = linear(k, xs, &wkv, &bkv)?;
    let drop = rng.as_deref_mut().filter(|_| p.p_attention > 0.0).map(|r| (p.p_attention, r));
    let ctx = attention(k, &q, &kv, mask, p.heads, drop)?;
    let hidden_dropout = |x: Tensor, rng: Option<&mut StdRng>| match rng {
        Some(r) if p.p_hidden > 0.0 => dropout(k, &x, p.p_hidden, r),
        _ => Ok(x),
    };
    let a = hidden_dropout(linear(k, &ctx, p.attention_output[0], p.attention_output[1])?, rng.as_deref_mut())?;
    let x1 = layer_norm(k, &(a + xq)?, p.attention_norm[0], p.attention_norm[1], p.eps as f64)?;
    let up = gelu_erf(k, &linear(k, &x1, p.intermediate[0], p.intermediate[1])?)?;
    let o = hidden_dropout(linear(k, &up, p.output[0], p.output[1])?, rng)?;
    layer_norm(k, &(o + x1)?, p.output_norm[0], p.output_norm[1], p.eps as f64)
}

/// A layer of hidden 8 in 2 heads from its 16 tensors in [`LayerParams`]' order.
fn layer_params<'a>(t: &[&'a Tensor], dropout: f32) -> LayerParams<'a> {
    LayerParams {
        query: [t[0], t[1]],
        key: [t[2], t[3]],
        value: [t[4], t[5]],
        attention_output: [t[6], t[7]],
        attention_norm: [t[8], t[9]],
        intermediate: [t[10], t[11]],
        output: [t[12], t[13]],
        output_norm: [t[14], t[15]],
        eps: 1e-12,
        heads: 2,
        p_attention: dropout,
        p_hidden: dropout,
    }
}

#[test]
fn encoder_layer_as_one_op_equals_the_layer_op_by_op() {
    let mut rng = StdRng::seed_from_u64(13);
    let (h, i) = (8, 12);
    let shapes: [&[usize]; 16] = [
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h],
        &[h],
        &[i, h],
        &[i],
        &[h, i],
        &[h],
        &[h],
        &[h],
    ];
    let vars: Vec<Var> = shapes.iter().map(|s| var(&mut rng, s, 0.6)).collect();
    let (x, _, mask) = attention_inputs(&mut rng, 5);
    let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    for kernels in [Kernels::Fused, Kernels::Bf16] {
        for p in [0.0f32, 0.2] {
            for nq in [5, 1] {
                let params = layer_params(&t, p);
                let case = format!("{kernels:?}, dropout {p}, {nq} queries");
                assert!(trains_fused(kernels, x.as_tensor(), &params), "{case}");
                let seeded = || StdRng::seed_from_u64(21);
                let ours = encoder_layer(kernels, &params, x.as_tensor(), &mask, nq, Some(&mut seeded())).unwrap();
                let want = layer_op_by_op(kernels, &params, x.as_tensor(), &mask, nq, Some(&mut seeded())).unwrap();
                assert_eq!(ours.dims(), [2, nq, h], "{case}");
                close(&ours, &want, 1e-6);
                let r = Tensor::from_vec(random(&mut rng, &[2, nq, h], 1.0), (2, nq, h), &Device::Cpu).unwrap();
                let g1 = super::backward(&(ours * &r).unwrap().sum_all().unwrap()).unwrap();
                let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (j, v) in vars.iter().chain([&x]).enumerate() {
                    let (a, b) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                    assert!(a.is_some() && b.is_some(), "{case}: tensor {j} has no gradient");
                    close(a.unwrap(), b.unwrap(), 1e-5);
                }
            }
        }
    }
    // An input that does not train (the embeddings frozen): the parameters still get theirs.
    let params = layer_params(&t, 0.0);
    let frozen = x.as_tensor().detach();
    let ours = encoder_layer(Kernels::Fused, &params, &frozen, &mask, 5, None).unwrap();
    let want = layer_op_by_op(Kernels::Fused, &params, &frozen, &mask, 5, None).unwrap();
    let g1 = super::backward(&ours.sqr().unwrap().sum_all().unwrap()).unwrap();
    let g2 = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (j, v) in vars.iter().enumerate() {
        let (a, b) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
        assert!(a.is_some() && b.is_some(), "frozen input: tensor {j} has no gradient");
        close(a.unwrap(), b.unwrap(), 1e-5);
    }
    // Without a gradient to compute (plain tensors), the op-by-op path stays.
    let plain: Vec<Tensor> = t.iter().map(|t| t.detach()).collect();
    let p = layer_params(&plain.iter().collect::<Vec<_>>(), 0.0);
    assert!(!trains_fused(Kernels::Fused, &x.as_tensor().detach(), &p));
    assert!(!trains_fused(Kernels::Reference, x.as_tensor(), &p));
}
