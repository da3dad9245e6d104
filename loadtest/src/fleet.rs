//! The subscribers as the run's orchestrator sees them: either held in this
//! process (`Local`: a tokio runtime for handshakes, and receive rings or
//! tokio tasks for reading) or spread over child processes (`--procs`,
//! `child.rs`). Both answer the same questions: how many are ready, freeze
//! the set, start an epoch, what arrived. Statistics stay per thread (and per
//! process) and are summed when read.

use crate::account::DeliveryCounts;
use crate::child::ChildProc;
use crate::cli::RecvPath;
use crate::clock::now_ns;
use crate::plan::Plan;
use crate::sub::{self, ConnStats, Reader, Shared, StreamStats};
use crate::uring;
use anyhow::Result;
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// Time given to subscriber tasks to see the freeze before counts are read:
/// an acknowledgement being handled at the instant of the freeze finishes
/// well within it.
const FREEZE_SETTLE: Duration = Duration::from_millis(20);

/// The subscriber set once frozen: this defines each message's expected deliveries.
#[derive(Clone, Debug, Default)]
pub(crate) struct Frozen {
    /// Ready subscribers.
    pub(crate) ready: u64,
    /// Ready subscribers per topic.
    pub(crate) topic_ready: Vec<u64>,
}

/// How the receive side ran, for the report.
#[derive(Clone, Debug, Default)]
pub(crate) struct RecvInfo {
    /// Receives re-armed after the ring ran out of buffers (uring path).
    pub(crate) rearms: u64,
    /// Rings that could not use DEFER_TASKRUN (uring path).
    pub(crate) not_deferred: u64,
    /// Batch window in force, microseconds (uring path; 0 if none or refused).
    pub(crate) batch_us: u32,
}

/// Subscribers held in this process.
pub(crate) struct Local {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    pool: Option<uring::Pool>,
    count: usize,
}

impl Local {
    /// Starts connecting this process's share of the subscribers (ramped by
    /// `--connect-rate`, at most `--connect-concurrency` handshakes at once).
    pub(crate) fn start(plan: &Plan) -> Result<Local> {
        let a = &plan.args;
        let range = plan.local_subscribers();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(plan.threads)
            .thread_name(format!("{}tokio", sub::THREAD_PREFIX))
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::new(a.topics, a.publishers, plan.churn));
        let pool = match a.recv_path {
            RecvPath::Uring => Some(uring::Pool::start(
                shared.clone(),
                plan.threads,
                a.recv_batch_us,
                rt.handle().clone(),
            )?),
            RecvPath::Tokio => None,
        };
        let reader = pool.clone().map_or(Reader::Tokio, Reader::Uring);
        let specs = range
            .clone()
            .map(|i| plan.spec(i))
            .collect::<Result<Vec<_>>>()?;
        let gate = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
        let (sh, connect_rate, timeout) = (shared.clone(), a.connect_rate, a.connect_timeout);
        rt.spawn(async move {
            let start = now_ns();
            for (i, spec) in specs.into_iter().enumerate() {
                if connect_rate > 0.0 {
                    let due = start + (i as f64 * 1e9 / connect_rate) as u64;
                    let now = now_ns();
                    if due > now + 1_000_000 {
                        tokio::time::sleep(Duration::from_nanos(due - now)).await;
                    }
                }
                tokio::spawn(sub::run(
                    sh.clone(),
                    spec,
                    gate.clone(),
                    timeout,
                    reader.clone(),
                ));
            }
        });
        Ok(Local {
            rt,
            shared,
            pool,
            count: range.len(),
        })
    }

    /// (ready, settled) so far.
    pub(crate) fn progress(&self) -> (u64, u64) {
        (
            self.shared.ready.load(Relaxed),
            self.shared.settled.load(Relaxed),
        )
    }

    /// Freezes the ready set: later acknowledgements are excluded, and
    /// subscribers not settled by now are counted as not ready.
    pub(crate) fn freeze(&self) -> Frozen {
        let sh = &self.shared;
        sh.frozen.store(true, SeqCst);
        std::thread::sleep(FREEZE_SETTLE);
        let not_ready = self.count as u64 - sh.settled.load(SeqCst).min(self.count as u64);
        sh.conn.not_ready.store(not_ready, Relaxed);
        Frozen {
            ready: sh.ready.load(SeqCst),
            topic_ready: sh
                .topic_ready
                .iter()
                .map(|t| t.load(SeqCst) as u64)
                .collect(),
        }
    }

    /// Starts counting epoch `epoch`, measuring messages scheduled from
    /// `measure_start`; subscribers drop (if asked to) until `end`.
    pub(crate) fn begin_epoch(&self, epoch: u32, measure_start: u64, end: u64) {
        self.shared.epoch.store(epoch, SeqCst);
        let _ = self.shared.take_stats();
        self.shared.measure_start_ns.store(measure_start, SeqCst);
        let churn = &self.shared.churn;
        if churn.drops() {
            self.shared
                .set_churn_window(churn.window(measure_start, end));
        }
    }

    /// The run's stream figures so far.
    pub(crate) fn stream_stats(&self) -> StreamStats {
        self.shared.stream_stats()
    }

    /// Unique deliveries of this epoch so far, and dropped subscribers whose
    /// reconnect has not been answered yet.
    pub(crate) fn drain_state(&self) -> (u64, u64) {
        (
            self.shared.unique_so_far(),
            self.shared.resuming.load(SeqCst),
        )
    }

    /// This epoch's counts and latency histogram (and resets them).
    pub(crate) fn take_stats(&self) -> (DeliveryCounts, Histogram<u64>) {
        self.shared.take_stats()
    }

    /// Connection outcome counters.
    pub(crate) fn conn_stats(&self) -> ConnStats {
        self.shared.conn_stats()
    }

    /// Receive-path diagnostics.
    pub(crate) fn recv_info(&self) -> RecvInfo {
        match &self.pool {
            Some(p) => RecvInfo {
                rearms: p.rearms(),
                not_deferred: u64::from(!p.deferred()),
                batch_us: p.batch_us(),
            },
            None => RecvInfo::default(),
        }
    }

    /// Stops reading and reconnecting; sockets close when the process exits.
    pub(crate) fn shutdown(self) {
        self.shared.stopping.store(true, SeqCst);
        if let Some(p) = &self.pool {
            p.stop();
        }
        self.rt.shutdown_background();
    }
}

/// All subscribers of the run.
pub(crate) enum Fleet {
    /// In this process.
    Local(Local),
    /// In `--procs` child processes.
    Children(Vec<ChildProc>),
}

impl Fleet {
    /// Starts the subscribers: here, or in `--procs` children.
    pub(crate) fn start(plan: &Plan) -> Result<Fleet> {
        if plan.args.procs > 1 {
            let kids = (0..plan.args.procs)
                .map(ChildProc::spawn)
                .collect::<Result<Vec<_>>>()?;
            Ok(Fleet::Children(kids))
        } else {
            Ok(Fleet::Local(Local::start(plan)?))
        }
    }

    /// (ready, settled) so far, over all processes.
    pub(crate) fn progress(&mut self) -> Result<(u64, u64)> {
        match self {
            Fleet::Local(l) => Ok(l.progress()),
            Fleet::Children(k) => {
                let mut sum = (0, 0);
                for r in ChildProc::ask_all(k, "status")? {
                    sum.0 += r["ready"].as_u64().unwrap_or(0);
                    sum.1 += r["settled"].as_u64().unwrap_or(0);
                }
                Ok(sum)
            }
        }
    }

    /// Freezes every process's ready set and sums them.
    pub(crate) fn freeze(&mut self, topics: usize) -> Result<Frozen> {
        match self {
            Fleet::Local(l) => Ok(l.freeze()),
            Fleet::Children(k) => {
                let mut f = Frozen {
                    ready: 0,
                    topic_ready: vec![0; topics],
                };
                for r in ChildProc::ask_all(k, "freeze")? {
                    f.ready += r["ready"].as_u64().unwrap_or(0);
                    for (t, n) in f.topic_ready.iter_mut().zip(
                        r["topic_ready"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default(),
                    ) {
                        *t += n.as_u64().unwrap_or(0);
                    }
                }
                Ok(f)
            }
        }
    }

    /// Starts counting epoch `epoch` everywhere.
    pub(crate) fn begin_epoch(&mut self, epoch: u32, measure_start: u64, end: u64) -> Result<()> {
        match self {
            Fleet::Local(l) => l.begin_epoch(epoch, measure_start, end),
            Fleet::Children(k) => {
                ChildProc::ask_all(k, &format!("epoch {epoch} {measure_start} {end}"))?;
            }
        }
        Ok(())
    }

    /// The run's stream figures, summed over processes.
    pub(crate) fn stream_stats(&mut self, topics: usize) -> Result<StreamStats> {
        match self {
            Fleet::Local(l) => Ok(l.stream_stats()),
            Fleet::Children(k) => {
                let mut sum = StreamStats::new(topics);
                for r in ChildProc::ask_all(k, "streams")? {
                    sum.add(&crate::child::streams_from_json(&r)?);
                }
                Ok(sum)
            }
        }
    }

    /// Unique deliveries of this epoch so far, and reconnects not answered
    /// yet, over all processes.
    pub(crate) fn drain_state(&mut self) -> Result<(u64, u64)> {
        match self {
            Fleet::Local(l) => Ok(l.drain_state()),
            Fleet::Children(k) => {
                Ok(ChildProc::ask_all(k, "unique")?
                    .iter()
                    .fold((0, 0), |(u, r), a| {
                        (
                            u + a["unique"].as_u64().unwrap_or(0),
                            r + a["resuming"].as_u64().unwrap_or(0),
                        )
                    }))
            }
        }
    }

    /// This epoch's counts summed and histograms merged (V2 serializations
    /// from children), and resets them.
    pub(crate) fn take_stats(&mut self) -> Result<(DeliveryCounts, Histogram<u64>)> {
        match self {
            Fleet::Local(l) => Ok(l.take_stats()),
            Fleet::Children(k) => {
                let mut counts = DeliveryCounts::default();
                let mut hist = sub::new_histogram();
                for r in ChildProc::ask_all(k, "stats")? {
                    let (c, h) = crate::child::stats_from_json(&r)?;
                    counts.add(&c);
                    hist.add(&h)?;
                }
                Ok((counts, hist))
            }
        }
    }

    /// Connection outcome counters summed over processes.
    pub(crate) fn conn_stats(&mut self) -> Result<ConnStats> {
        match self {
            Fleet::Local(l) => Ok(l.conn_stats()),
            Fleet::Children(k) => {
                let mut sum = ConnStats::default();
                for r in ChildProc::ask_all(k, "conns")? {
                    sum.add(&crate::child::conns_from_json(&r));
                }
                Ok(sum)
            }
        }
    }

    /// Receive-path diagnostics summed over processes.
    pub(crate) fn recv_info(&mut self) -> Result<RecvInfo> {
        match self {
            Fleet::Local(l) => Ok(l.recv_info()),
            Fleet::Children(k) => {
                let mut sum = RecvInfo::default();
                for r in ChildProc::ask_all(k, "recv")? {
                    sum.rearms += r["rearms"].as_u64().unwrap_or(0);
                    sum.not_deferred += r["not_deferred"].as_u64().unwrap_or(0);
                    sum.batch_us = sum.batch_us.max(r["batch_us"].as_u64().unwrap_or(0) as u32);
                }
                Ok(sum)
            }
        }
    }

    /// Process ids of the subscriber children (empty when local), for client CPU.
    pub(crate) fn child_pids(&self) -> Vec<String> {
        match self {
            Fleet::Local(_) => Vec::new(),
            Fleet::Children(k) => k.iter().map(|c| c.pid().to_string()).collect(),
        }
    }

    /// Ends the subscribers (children exit when their stdin closes).
    pub(crate) fn shutdown(self) {
        match self {
            Fleet::Local(l) => l.shutdown(),
            Fleet::Children(k) => ChildProc::end_all(k),
        }
    }
}
