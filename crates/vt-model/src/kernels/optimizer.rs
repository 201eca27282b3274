//! The optimisers' update of one parameter tensor in one pass over its memory. As candle
//! tensor operations an AdamW step takes about fourteen passes and an SGD step with momentum
//! six, each allocating its result; on a GPU each is also a kernel launch (about 1,000 per
//! AdamW step of vt-resnet18's 66 parameter tensors), issued while the GPU waits, since the
//! step follows the read of the gradient norm. Each element goes through the tensor
//! operations' arithmetic in their order, so the results agree with them.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of the CPU loops.
pub const OPTIMIZER_CHUNK: usize = 1 << 14;

/// One AdamW step's scalars (PyTorch's `torch.optim.AdamW`: decoupled weight decay, bias
/// corrections `bias1 = 1 - beta1^t`, `bias2 = 1 - beta2^t`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub bias1: f64,
    pub bias2: f64,
}

/// One SGD step's scalars (PyTorch's `torch.optim.SGD` with momentum, dampening 0, coupled
/// weight decay, optionally Nesterov).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
}

/// AdamW's scalars in f32, rounded as candle's `tensor * f64` and `tensor / f64` round them.
#[derive(Debug, Clone, Copy)]
pub(super) struct AdamWScalars {
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub keep1: f32,
    pub keep2: f32,
    pub inv_bias2_sqrt: f32,
    pub eps: f32,
    pub step: f32,
}

impl AdamWStep {
    /// The scalars of step `t` (counted from 1), its bias corrections included.
    pub fn at_step(
        t: i32,
        lr: f64,
        weight_decay: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
    ) -> Self {
        AdamWStep {
            lr,
            weight_decay,
            beta1,
            beta2,
            eps,
            bias1: 1.0 - beta1.powi(t),
            bias2: 1.0 - beta2.powi(t),
        }
    }

    fn scalars(&self) -> AdamWScalars {
        AdamWScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            keep1: (1.0 - self.beta1) as f32,
            keep2: (1.0 - self.beta2) as f32,
            inv_bias2_sqrt: (1.0 / self.bias2.sqrt()) as f32,
            eps: self.eps as f32,
            step: (self.lr / self.bias1) as f32,
        }
    }

    /// (parameter, first moment, second moment) after the step; `moments` None means zeros.
    /// None unless every tensor is contiguous f32 of one shape, on the CPU or (feature
    /// `cuda`) a GPU.
    pub fn fused(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        moments: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let mut tensors = vec![theta, grad];
        tensors.extend(moments.iter().flat_map(|(m, v)| [*m, *v]));
        if !fusable(&tensors) {
            return Ok(None);
        }
        let s = self.scalars();
        match theta.device() {
            Device::Cpu => {
                let (n, shape, device) = (theta.elem_count(), theta.shape(), theta.device());
                let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
                let data = guards.iter().map(cpu_f32).collect::<Result<Vec<_>>>()?;
                let zeros = vec![0f32; if moments.is_none() { n } else { 0 }];
                let (theta, grad) = (data[0], data[1]);
                let (m, v) = match data.get(2..4) {
                    Some(&[m, v]) => (m, v),
                    _ => (&zeros[..], &zeros[..]),
                };
                let (mut next, mut m_next, mut v_next) =
                    (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                next.par_chunks_mut(OPTIMIZER_CHUNK)
                    .zip(m_next.par_chunks_mut(OPTIMIZER_CHUNK))
                    .zip(v_next.par_chunks_mut(OPTIMIZER_CHUNK))
                    .enumerate()
                    .for_each(|(chunk, ((next, m_next), v_next))| {
                        let range = chunk * OPTIMIZER_CHUNK..chunk * OPTIMIZER_CHUNK + next.len();
                        let inputs = theta[range.clone()]
                            .iter()
                            .zip(&grad[range.clone()])
                            .zip(&m[range.clone()])
                            .zip(&v[range]);
                        let outputs = next.iter_mut().zip(m_next).zip(v_next);
                        for ((((&theta, &g), &m), &v), ((next, m_next), v_next)) in
                            inputs.zip(outputs)
                        {
                            let m = m * s.beta1 + g * s.keep1;
                            let v = v * s.beta2 + g * g * s.keep2;
                            *next = theta * s.decay
                                - m / (v.sqrt() * s.inv_bias2_sqrt + s.eps) * s.step;
                            *m_next = m;
                            *v_next = v;
                        }
                    });
                let tensor = |data: Vec<f32>| Tensor::from_vec(data, shape, device);
                Ok(Some((tensor(next)?, tensor(m_next)?, tensor(v_next)?)))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => super::cuda::adamw(&s, theta, grad, moments).map(Some),
            _ => Ok(None),
        }
    }
}

impl SgdStep {
    /// (parameter, momentum buffer) after the step; `buffer` None on the first step (the
    /// buffer starts as the step's gradient). None without momentum, and unless every tensor
    /// is contiguous f32 of one shape, on the CPU or (feature `cuda`) a GPU.
    pub fn fused(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        buffer: Option<&Tensor>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let mut tensors = vec![theta, grad];
        tensors.extend(buffer);
        if self.momentum == 0.0 || !fusable(&tensors) {
            return Ok(None);
        }
        // As candle rounds `tensor * f64`.
        let (wd, momentum, lr) = (
            self.weight_decay as f32,
            self.momentum as f32,
            self.lr as f32,
        );
        let (decays, nesterov) = (self.weight_decay != 0.0, self.nesterov);
        match theta.device() {
            Device::Cpu => {
                let (n, shape, device) = (theta.elem_count(), theta.shape(), theta.device());
                let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
                let data = guards.iter().map(cpu_f32).collect::<Result<Vec<_>>>()?;
                let (theta, grad) = (data[0], data[1]);
                // The first step reads no buffer: the loop is given the parameter in its place.
                let (buffer, fresh) = match data.get(2) {
                    Some(&buffer) => (buffer, false),
                    None => (theta, true),
                };
                let (mut next, mut buf_next) = (vec![0f32; n], vec![0f32; n]);
                next.par_chunks_mut(OPTIMIZER_CHUNK)
                    .zip(buf_next.par_chunks_mut(OPTIMIZER_CHUNK))
                    .enumerate()
                    .for_each(|(chunk, (next, buf_next))| {
                        let range = chunk * OPTIMIZER_CHUNK..chunk * OPTIMIZER_CHUNK + next.len();
                        let inputs = theta[range.clone()]
                            .iter()
                            .zip(&grad[range.clone()])
                            .zip(&buffer[range]);
                        for (((&theta, &g), &b), (next, buf_next)) in
                            inputs.zip(next.iter_mut().zip(buf_next))
                        {
                            let d = if decays { g + theta * wd } else { g };
                            let buf = if fresh { d } else { b * momentum + d };
                            let update = if nesterov { d + buf * momentum } else { buf };
                            *next = theta - update * lr;
                            *buf_next = buf;
                        }
                    });
                let tensor = |data: Vec<f32>| Tensor::from_vec(data, shape, device);
                Ok(Some((tensor(next)?, tensor(buf_next)?)))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let scalars = super::cuda::SgdScalars {
                    weight_decay: if decays { wd } else { 0.0 },
                    momentum,
                    nesterov: i32::from(nesterov),
                    lr,
                };
                super::cuda::sgd(&scalars, theta, grad, buffer).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// Whether the fused loops take these tensors: contiguous f32 of the first one's shape, all
/// on its device.
fn fusable(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    tensors.iter().all(|t| {
        t.dtype() == DType::F32
            && t.shape() == first.shape()
            && t.is_contiguous()
            && t.device().same_device(first.device())
    })
}

/// The elements of a contiguous f32 CPU tensor, read through its storage guard.
fn cpu_f32<'a>((storage, layout): &'a (StorageRef<'_>, &Layout)) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(data)) = &**storage else {
        candle_core::bail!("the fused optimiser step takes f32 CPU tensors here");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("the fused optimiser step takes contiguous tensors"),
    }
}
