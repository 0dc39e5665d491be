//! The ramp chart (`pingme-loadgen ramp-chart`): connections and memory
//! over time, from the samples a harness records while it brings many
//! idle connections up (`benches/million.sh` writes one line a second).
//! Top panel: connections up (the gateways' own gauges); bottom panel:
//! memory in GiB: all gateway processes' RSS together, all load generator
//! processes' RSS together, the kernel's slab (where socket structures
//! live), the kernel's TCP buffer memory (`/proc/net/sockstat` `mem`), and
//! the machine's used memory (MemTotal - MemAvailable).
//!
//! The samples file is CSV with a header naming these columns, in any
//! order: `second,connections,gateways_rss_kib,loadgens_rss_kib,slab_kib,
//! tcp_mem_pages,used_kib`; other columns are ignored.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::chart::{FAMILY, HEIGHT, headroom, legend, legend_key, write_bitmap};

const CONNECTIONS: RGBColor = RGBColor(31, 119, 180);
const GATEWAYS: RGBColor = RGBColor(214, 39, 40);
const LOADGENS: RGBColor = RGBColor(44, 160, 44);
const SLAB: RGBColor = RGBColor(148, 103, 189);
const TCP_MEM: RGBColor = RGBColor(255, 127, 14);
const USED: RGBColor = RGBColor(127, 127, 127);

/// Bytes of one page in `/proc/net/sockstat`'s `mem`.
const PAGE_BYTES: f64 = 4096.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// One sample of the ramp.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RampSample {
    /// Seconds since the harness started sampling.
    pub second: f64,
    /// Connections up on all gateways.
    pub connections: u64,
    /// All gateway processes' resident memory, KiB.
    pub gateways_rss_kib: u64,
    /// All load generator processes' resident memory, KiB.
    pub loadgens_rss_kib: u64,
    /// The kernel's slab (Slab in /proc/meminfo), KiB.
    pub slab_kib: u64,
    /// TCP buffer pages (/proc/net/sockstat `TCP: ... mem`).
    pub tcp_mem_pages: u64,
    /// MemTotal - MemAvailable, KiB.
    pub used_kib: u64,
}

const COLUMNS: [&str; 7] = [
    "second",
    "connections",
    "gateways_rss_kib",
    "loadgens_rss_kib",
    "slab_kib",
    "tcp_mem_pages",
    "used_kib",
];

/// Parses the samples file; a line that does not parse is an error naming
/// it (a harness bug should not draw a silently wrong chart).
pub fn parse_samples(text: &str) -> anyhow::Result<Vec<RampSample>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("the samples file is empty"))?
        .split(',')
        .map(str::trim)
        .collect();
    let index: Vec<usize> = COLUMNS
        .iter()
        .map(|name| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| anyhow::anyhow!("the samples header has no column {name}"))
        })
        .collect::<anyhow::Result<_>>()?;
    lines
        .enumerate()
        .map(|(n, line)| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |column: usize| -> anyhow::Result<&str> {
                fields.get(index[column]).copied().ok_or_else(|| {
                    anyhow::anyhow!("samples line {}: no {}", n + 2, COLUMNS[column])
                })
            };
            let int = |column: usize| -> anyhow::Result<u64> {
                field(column)?.parse().map_err(|e| {
                    anyhow::anyhow!("samples line {}: {}: {e}", n + 2, COLUMNS[column])
                })
            };
            Ok(RampSample {
                second: field(0)?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("samples line {}: second: {e}", n + 2))?,
                connections: int(1)?,
                gateways_rss_kib: int(2)?,
                loadgens_rss_kib: int(3)?,
                slab_kib: int(4)?,
                tcp_mem_pages: int(5)?,
                used_kib: int(6)?,
            })
        })
        .collect()
}

/// Draws the ramp into a PNG file (the chart size of `crate::chart`).
pub fn write_png(samples: &[RampSample], title: &str, path: &Path) -> anyhow::Result<()> {
    write_bitmap(path, |root| draw(root, samples, title))
}

/// A line of the memory panel: its label, colour and value in GiB.
type MemorySeries = (&'static str, RGBColor, fn(&RampSample) -> f64);

fn gib(kib: u64) -> f64 {
    kib as f64 * 1024.0 / GIB
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    samples: &[RampSample],
    title: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(HEIGHT / 2);
    let last = samples.iter().map(|s| s.second).fold(1.0, f64::max);

    let connections_max = headroom(samples.iter().map(|s| s.connections).max().unwrap_or(0) as f64);
    let mut up = ChartBuilder::on(&top)
        .caption(format!("{title} - connections up"), (FAMILY, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..last, 0.0..connections_max)?;
    up.configure_mesh()
        .x_desc("second")
        .y_desc("connections")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FAMILY, 14))
        .draw()?;
    up.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.second, s.connections as f64)),
        CONNECTIONS.stroke_width(3),
    ))?
    .label("connections (gateways' gauges)")
    .legend(legend_key(CONNECTIONS, 3));
    legend(&mut up)?;

    let series: [MemorySeries; 5] = [
        ("machine used", USED, |s| gib(s.used_kib)),
        ("kernel slab", SLAB, |s| gib(s.slab_kib)),
        ("gateways RSS", GATEWAYS, |s| gib(s.gateways_rss_kib)),
        ("load generators RSS", LOADGENS, |s| gib(s.loadgens_rss_kib)),
        ("kernel TCP buffers (sockstat mem)", TCP_MEM, |s| {
            s.tcp_mem_pages as f64 * PAGE_BYTES / GIB
        }),
    ];
    let memory_max = headroom(
        samples
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, value)| value(s)))
            .fold(0.0, f64::max),
    );
    let mut memory = ChartBuilder::on(&bottom)
        .caption("memory", (FAMILY, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..last, 0.0..memory_max)?;
    memory
        .configure_mesh()
        .x_desc("second")
        .y_desc("GiB")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FAMILY, 14))
        .draw()?;
    for (label, color, value) in &series {
        let color = *color;
        memory
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.second, value(s))),
                color.stroke_width(3),
            ))?
            .label(*label)
            .legend(legend_key(color, 3));
    }
    legend(&mut memory)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::{count, render_pixels};

    const SAMPLES: &str = "\
second,connections,gateways_rss_kib,loadgens_rss_kib,slab_kib,tcp_mem_pages,used_kib,load
0,0,100000,50000,200000,10,2000000,0.5
1,50000,200000,150000,600000,40,3000000,1.0
2,100000,300000,250000,1000000,60,4000000,1.5
";

    #[test]
    fn samples_parse_by_header_name_and_bad_lines_are_named() {
        let samples = parse_samples(SAMPLES).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[2].connections, 100_000);
        assert_eq!(samples[1].loadgens_rss_kib, 150_000);
        assert_eq!(samples[2].tcp_mem_pages, 60);
        let error = parse_samples(&format!("{SAMPLES}3,x,1,1,1,1,1,1\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 5: connections"), "{error}");
        assert!(parse_samples("second,connections\n1,2\n").is_err());
        assert!(parse_samples("").is_err());
    }

    #[test]
    fn every_series_is_drawn() {
        let render = |samples: &[RampSample]| render_pixels(|root| draw(root, samples, "ramp"));
        let drawn = render(&parse_samples(SAMPLES).unwrap());
        let empty = render(&[]);
        for color in [CONNECTIONS, GATEWAYS, LOADGENS, SLAB, USED] {
            assert!(
                count(&drawn, color) > count(&empty, color) + 200,
                "{color:?} not drawn"
            );
        }
    }

    #[test]
    fn the_chart_is_written_as_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ramp.png");
        write_png(&parse_samples(SAMPLES).unwrap(), "ramp", &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(&[0x89, b'P', b'N', b'G']));
    }
}
