//! The router's metrics are recorded under their documented names (its own
//! test binary: the recorder is process-global).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use pingme_router::{RouterConfig, telemetry};

/// Counts every counter increment and histogram sample per name+labels.
#[derive(Default)]
struct CountingRecorder {
    cells: Mutex<HashMap<String, Arc<Cell>>>,
}

#[derive(Default)]
struct Cell(AtomicU64);

impl HistogramFn for Cell {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl CountingRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut name = key.name().to_string();
        for label in key.labels() {
            name.push_str(&format!("{{{}={}}}", label.key(), label.value()));
        }
        self.cells.lock().unwrap().entry(name).or_default().clone()
    }

    fn value(&self, name: &str) -> u64 {
        self.cells
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for &'static CountingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = self.cell(key);
        Counter::from_arc(Arc::new(CellCounter(cell)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        // Gauges count "was set" via a plain atomic (its bits hold the value).
        self.cell(key);
        Gauge::from_arc(Arc::new(AtomicU64::new(0)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

struct CellCounter(Arc<Cell>);

impl metrics::CounterFn for CellCounter {
    fn increment(&self, value: u64) {
        self.0.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.0.store(value, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_duplicates_failures_and_appends_are_counted() {
    let recorder: &'static CountingRecorder = Box::leak(Box::default());
    metrics::set_global_recorder(recorder).unwrap();

    let h = Harness::start(RouterConfig::default());
    let (alice, bob, eve) = (
        h.user("alice").await,
        h.user("bob").await,
        h.user("eve").await,
    );
    let a = h.online(alice, "phone", 1);
    let b = h.online(bob, "phone", 2);
    let e = h.online(eve, "phone", 3);
    let conversation = dm(alice, bob);
    h.send(&a, 1, &conversation, "one", "x");
    h.send(&a, 2, &conversation, "two", "x");
    h.send(&a, 3, &conversation, "one", "x");
    h.send(&e, 4, &conversation, "intrude", "x");
    h.answer(a.conn, 3).await;
    h.answer(e.conn, 4).await;
    // The repeat is delivered again (at least once; clients drop the seq).
    h.deliveries(b.conn, 3).await;
    h.router.shutdown().await;

    assert_eq!(recorder.value(telemetry::ACCEPTED), 2);
    assert_eq!(recorder.value(telemetry::DUPLICATES), 1);
    assert_eq!(
        recorder.value(&format!("{}{{code=10009}}", telemetry::FAILED)),
        1
    );
    assert_eq!(recorder.value(telemetry::DELIVERED), 3);
    assert!(recorder.value(telemetry::APPEND_SECONDS) >= 1);
    assert!(
        recorder
            .cells
            .lock()
            .unwrap()
            .contains_key(&format!("{}{{topic=accepted}}", telemetry::QUEUE_DEPTH))
    );
}
