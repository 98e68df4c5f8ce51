//! tract — the pure-Rust engine, always built.
//!
//! The model is optimised once for a batch of one (tract's fastest plan for a fixed shape); a batch of N slices is
//! split over the available cores, each running slices one at a time through the shared plan.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tract_onnx::prelude::*;

use super::{available_threads, Engine};
use crate::model::Model;

type Plan = Arc<TypedRunnableModel>;

/// tract-onnx running the shipped model.
pub struct TractEngine {
    /// The optimised plan for a 1×C×H×W input.
    plan: Plan,
    /// Floats per input slice (C×H×W).
    input_len: usize,
    /// Floats per output slice (K×H×W).
    output_len: usize,
    /// Worker threads for a batch.
    threads: usize,
}

impl TractEngine {
    /// Loads and optimises the ONNX file of `model` for a fixed batch of one.
    pub fn load(model: &Model) -> Result<TractEngine> {
        let i = &model.manifest.input;
        let shape = [1usize, i.channels, i.height, i.width];
        let mut inference = tract_onnx::onnx()
            .model_for_path(&model.onnx_path)
            .with_context(|| format!("tract: reading {}", model.onnx_path.display()))?;
        // Pick the manifest's output when the graph has several.
        let out_name = &model.manifest.output.name;
        let outlets = inference.output_outlets()?.to_vec();
        if outlets.len() > 1 {
            let wanted: Vec<_> = outlets.iter().copied().filter(|o| inference.node(o.node).name == *out_name).collect();
            if wanted.len() == 1 {
                inference.select_output_outlets(&wanted)?;
            }
        }
        let plan = inference
            .with_input_fact(0, f32::fact(shape).into())
            .context("tract: setting the input shape")?
            .into_optimized()
            .context("tract: optimising the model")?
            .into_runnable()
            .context("tract: building the plan")?;
        // Probe once so shape errors show at load, not on the first series.
        let probe = Tensor::zero::<f32>(&shape)?;
        let out = plan.run(tvec!(probe.into()))?;
        let out_shape = out[0].shape().to_vec();
        let classes = model.manifest.output.classes.len();
        if out_shape != [1, classes, i.height, i.width] {
            bail!(
                "tract: model output shape {:?} does not match the manifest (1×{classes}×{}×{})",
                out_shape,
                i.height,
                i.width
            );
        }
        Ok(TractEngine {
            plan,
            input_len: i.channels * i.height * i.width,
            output_len: classes * i.height * i.width,
            threads: available_threads(),
        })
    }

    fn run_one(&self, input: &[f32], out: &mut [f32], shape: &[usize; 4]) -> Result<()> {
        let t = Tensor::from_shape(shape, input)?;
        let res = self.plan.run(tvec!(t.into()))?;
        let scores = res[0].try_as_plain_ram()?.as_slice::<f32>()?;
        if scores.len() != out.len() {
            bail!("tract: output has {} floats, expected {}", scores.len(), out.len());
        }
        out.copy_from_slice(scores);
        Ok(())
    }
}

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn infer(&self, input: &[f32], n: usize) -> Result<Vec<f32>> {
        if input.len() != n * self.input_len {
            bail!("tract: input has {} floats, expected {n}×{}", input.len(), self.input_len);
        }
        let shape = {
            let s = self.plan.model().input_fact(0)?.shape.as_concrete().map(|s| s.to_vec()).unwrap_or_default();
            [s[0], s[1], s[2], s[3]]
        };
        let mut out = vec![0f32; n * self.output_len];
        let workers = self.threads.min(n).max(1);
        if workers == 1 {
            for (inp, o) in input.chunks(self.input_len).zip(out.chunks_mut(self.output_len)) {
                self.run_one(inp, o, &shape)?;
            }
            return Ok(out);
        }
        let per_worker = n.div_ceil(workers);
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = input
                .chunks(per_worker * self.input_len)
                .zip(out.chunks_mut(per_worker * self.output_len))
                .map(|(inp, o)| {
                    scope.spawn(move || -> Result<()> {
                        for (i1, o1) in inp.chunks(self.input_len).zip(o.chunks_mut(self.output_len)) {
                            self.run_one(i1, o1, &shape)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("tract: a worker thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(out)
    }
}
