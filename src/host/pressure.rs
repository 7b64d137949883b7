//! The memory pressure watch: every [`WATCH_INTERVAL`] it reads how far the process is
//! from its limit ([`HostMemory::headroom_now`]) and sets the engine's park RAM budget to
//! what keeps the plan's reserve free ([`next_park_budget`]). Under pressure parked states
//! spill to disk (or are dropped without a disk tier) before the kernel's OOM killer has
//! to act; when the pressure is gone the budget returns to the plan.

use std::time::Duration;

use super::memory::{HostMemory, MemoryPlan, human_bytes, next_park_budget};
use crate::engine::EngineHandle;

/// How often the watch looks.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Budget changes smaller than this are not sent (they change nothing that matters).
const MIN_CHANGE: u64 = 1 << 20;

/// Runs the watch until `stop` resolves or the engine stops. Does nothing when the host
/// tells no figures.
pub async fn watch(
    host: HostMemory,
    plan: MemoryPlan,
    engine: EngineHandle,
    stop: impl std::future::Future<Output = ()>,
) {
    if plan.limit.is_none() {
        return;
    }
    tokio::select! {
        () = watch_loop(host, plan, engine) => {}
        () = stop => {}
    }
}

async fn watch_loop(host: HostMemory, plan: MemoryPlan, engine: EngineHandle) {
    let reserve = plan.reserve();
    let mut shedding = false;
    let mut ticks = tokio::time::interval(WATCH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while engine.is_alive() {
        ticks.tick().await;
        let host = host.clone();
        let Ok(Some(headroom)) = tokio::task::spawn_blocking(move || host.headroom_now()).await
        else {
            continue;
        };
        let stats = engine.stats();
        let budget = next_park_budget(plan.park_ram, stats.kv_park_ram_bytes, headroom, reserve);
        let current = stats.kv_park_ram_budget_bytes;
        // Small moves are noise, except a return to the plan or down to nothing.
        if budget == current
            || (budget.abs_diff(current) < MIN_CHANGE && budget != plan.park_ram && budget != 0)
        {
            continue;
        }
        let now_shedding = budget < plan.park_ram;
        if now_shedding && !shedding {
            tracing::warn!(
                headroom = %human_bytes(headroom),
                reserve = %human_bytes(reserve),
                parked = %human_bytes(stats.kv_park_ram_bytes),
                budget = %human_bytes(budget),
                "memory pressure: shrinking the park RAM budget, parked KV states spill to disk"
            );
        } else if !now_shedding && shedding {
            tracing::info!(
                budget = %human_bytes(budget),
                "memory pressure over: the park RAM budget is back to its plan"
            );
        }
        shedding = now_shedding;
        engine.set_park_ram_budget(budget);
    }
}
