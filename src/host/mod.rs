//! Host limits: what the machine gives this process, decided once at start-up and handed
//! down as numbers.
//!
//! - [`memory`]: the park RAM budget from the memory cgroup's limit (or `MemAvailable`)
//!   less the model's needs and a margin ([`memory::plan`]), read through [`cgroup`];
//!   [`pressure`] shrinks that budget while the process nears its limit.
//! - [`lock`]: one process per `--data-dir` (an exclusive `flock` on `<data-dir>/lock`).
//! - [`nofile`]: the open-file limit.
//!
//! May use `config`, `gguf` and `engine` (the pressure watch sets the engine's budget).

pub mod cgroup;
pub mod lock;
pub mod memory;
pub mod nofile;
pub mod pressure;

use crate::config::Config;
use memory::{HostMemory, MemoryNeeds, MemoryPlan};

/// Reads the host and the model's header, decides the park RAM budget for `config`
/// (`--kv-park-ram auto` or an explicit value that must fit), writes it into the engine's
/// park settings and logs how it was reached (a warning when a value was clamped or the
/// model alone does not fit).
pub fn plan_memory(config: &mut Config) -> (HostMemory, MemoryPlan) {
    let host = HostMemory::read();
    // A front without a local model needs nothing for one.
    let needs = match &config.engine {
        None => MemoryNeeds::default(),
        Some(engine) => MemoryNeeds::of_model(
            &engine.model_path,
            engine.slots.get() as u64,
            u64::from(engine.ctx_size.get()),
            u64::from(engine.batch_size.get()),
            &engine.kv,
        )
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot size the model's memory: the park RAM budget counts the weights only");
            MemoryNeeds {
                weights: std::fs::metadata(&engine.model_path).map_or(0, |m| m.len()),
                runtime: memory::RUNTIME_BYTES,
                ..MemoryNeeds::default()
            }
        }),
    };
    let plan = memory::plan(host.limit(), needs, config.kv_park_ram);
    if let Some(park) = config.engine.as_mut().and_then(|e| e.park.as_mut()) {
        park.ram_bytes = plan.park_ram;
        if let Some(asked) = plan.clamped_from {
            tracing::warn!(
                "--kv-park-ram {} MiB does not fit: clamped to {} MiB ({plan})",
                asked >> 20,
                plan.park_ram >> 20
            );
        } else {
            tracing::info!("memory plan: {plan}");
        }
    }
    if plan.overcommitted() {
        tracing::warn!(
            "the model and its slots need more memory than this process may use ({plan}); \
             expect it to be killed under load: lower --slots or --ctx-size, or use a smaller \
             quantization"
        );
    }
    (host, plan)
}
