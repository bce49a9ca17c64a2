//! HdrHistogram interval logs (`.hlog`, the format of HdrHistogram's
//! `HistogramLogProcessor` and friends) from a run's per-epoch records:
//! one interval per second of the run, tagged `pause` and
//! `checkpoint_latency`, values in µs (max-value divisor 1000: the usual
//! tools then print milliseconds).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use crate::metrics::EpochRecord;

#[derive(Debug, thiserror::Error)]
pub enum HlogError {
    #[error("writing interval log {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// One second per interval.
const INTERVAL_NS: u64 = 1_000_000_000;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Writes `records` (in acknowledgement order) to `path` as an interval
/// log; interval start times count from `base_ns` (CLOCK_MONOTONIC, the
/// clock of `EpochRecord::closed_at_ns`). `comment` goes in the header.
pub fn write(
    path: &Path,
    records: &[EpochRecord],
    base_ns: u64,
    comment: &str,
) -> Result<(), HlogError> {
    let err = |reason: String| HlogError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut buf = Vec::new();
    let mut ser = V2DeflateSerializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment(comment)
            .add_comment("values in microseconds; tags: pause, checkpoint_latency")
            .with_start_time(SystemTime::now())
            .with_max_value_divisor(1000.0)
            .begin_log_with(&mut buf, &mut ser)
            .map_err(|e| err(e.to_string()))?;
        let mut i = 0;
        while i < records.len() {
            let slot = records[i].closed_at_ns.saturating_sub(base_ns) / INTERVAL_NS;
            let (mut pause, mut latency) = (hist(), hist());
            while i < records.len()
                && records[i].closed_at_ns.saturating_sub(base_ns) / INTERVAL_NS == slot
            {
                let _ = pause.record(records[i].pause_us.max(1));
                let _ = latency.record(records[i].latency_us.max(1));
                i += 1;
            }
            let start = Duration::from_nanos(slot * INTERVAL_NS);
            let len = Duration::from_nanos(INTERVAL_NS);
            for (h, tag) in [(&pause, "pause"), (&latency, "checkpoint_latency")] {
                w.write_histogram(h, start, len, Tag::new(tag))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
    }
    std::fs::write(path, buf).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    #[test]
    fn round_trips_through_the_interval_log_reader() {
        let recs: Vec<EpochRecord> = (0..30u64)
            .map(|i| EpochRecord {
                epoch: i + 1,
                pause_us: 100 + i,
                latency_us: 5_000,
                closed_at_ns: 7_000_000_000 + i * 100_000_000,
                ..Default::default()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.hlog");
        write(&p, &recs, 7_000_000_000, "test").unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let mut tags = Vec::new();
        let mut deser = hdrhistogram::serialization::Deserializer::new();
        let mut count = 0;
        for e in IntervalLogIterator::new(&bytes) {
            if let LogEntry::Interval(h) = e.unwrap() {
                tags.push((h.tag().unwrap().as_str().to_string(), h.start_timestamp()));
                let raw = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    h.encoded_histogram(),
                )
                .unwrap();
                let hist: Histogram<u64> = deser.deserialize(&mut &raw[..]).unwrap();
                if tags.last().unwrap().0 == "pause" {
                    count += hist.len();
                }
            }
        }
        // 30 records over 3 s: 3 intervals, two tags each, every record kept.
        assert_eq!(tags.len(), 6, "{tags:?}");
        assert_eq!(tags[2], ("pause".into(), Duration::from_secs(1)));
        assert_eq!(count, 30);
    }
}
