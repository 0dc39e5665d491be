//! The timeline chart (`--timeline-png`): one PNG with two panels over the
//! run's seconds, throughput on top (delivered messages/s, acknowledged
//! sends/s, and connections up on a right-hand axis) and send-to-deliver
//! latency below (p50 and p99 of each second, plus send-to-ack p99, in ms).
//!
//! Text is drawn with DejaVu Sans Mono embedded in the binary
//! (`loadgen/assets/`, Bitstream Vera licence), so drawing needs no system
//! fonts or libraries.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::report::{Report, Sample};

/// Width of the PNG, pixels.
pub const WIDTH: u32 = 1200;
/// Height of the PNG, pixels.
pub const HEIGHT: u32 = 800;

/// A drawing error of the bitmap backend (its error type is not exported
/// by name).
pub(crate) type BitmapError =
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// The font every label is drawn with.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// The family name plotters looks text up by.
pub(crate) const FAMILY: &str = "sans-serif";

const DELIVERED: RGBColor = RGBColor(31, 119, 180);
const ACKED: RGBColor = RGBColor(44, 160, 44);
const CONNECTED: RGBColor = RGBColor(127, 127, 127);
const P50: RGBColor = RGBColor(31, 119, 180);
const P99: RGBColor = RGBColor(214, 39, 40);
const ACK_P99: RGBColor = RGBColor(255, 127, 14);

/// Draws the report's timeline into a PNG file of `WIDTH` x `HEIGHT`.
pub fn write_png(report: &Report, path: &Path) -> anyhow::Result<()> {
    write_bitmap(path, |root| draw(root, report))
}

/// A chart PNG of `WIDTH` x `HEIGHT` at `path`, drawn by `draw`, text in
/// the embedded font (every chart of the load generator is drawn so).
pub(crate) fn write_bitmap(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), BitmapError>,
) -> anyhow::Result<()> {
    register_embedded_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root)
        .and_then(|()| root.present())
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// Registers the embedded font once per process (plotters keeps a global
/// font table).
fn register_embedded_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(ok, "the embedded chart font does not parse");
    Ok(())
}

/// Draws both panels on any plotters backend (a file, or a pixel buffer in
/// the tests).
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(HEIGHT / 2);
    let timeline = &report.timeline;
    let last_second = timeline.iter().map(|s| s.second).max().unwrap_or(0).max(1);

    // Throughput, with the connection count on its own axis: a fleet of
    // 100k idle connections and 500 msgs/s share no useful scale.
    let rate_max = headroom(
        timeline
            .iter()
            .map(|s| s.delivered.max(s.acked) as f64)
            .fold(0.0, f64::max),
    );
    let connected_max = timeline.iter().map(|s| s.connected).max().unwrap_or(0);
    let mut throughput = ChartBuilder::on(&top)
        .caption(
            format!("{} - throughput per second", report.scenario),
            (FAMILY, 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .right_y_label_area_size(if connected_max > 0 { 80 } else { 0 })
        .build_cartesian_2d(0..last_second, 0.0..rate_max)?
        .set_secondary_coord(0..last_second, 0.0..headroom(connected_max as f64));
    throughput
        .configure_mesh()
        .x_desc("second")
        .y_desc("messages/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FAMILY, 14))
        .draw()?;
    // Sends under deliveries, wider: in a chat run they coincide (one
    // recipient per message) and both must stay visible.
    draw_line(&mut throughput, timeline, ACKED, 5, "sends acked/s", |s| {
        Some(s.acked as f64)
    })?;
    draw_line(
        &mut throughput,
        timeline,
        DELIVERED,
        2,
        "delivered/s",
        |s| Some(s.delivered as f64),
    )?;
    if connected_max > 0 {
        throughput
            .configure_secondary_axes()
            .y_desc("connected")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FAMILY, 14))
            .draw()?;
        throughput
            .draw_secondary_series(LineSeries::new(
                timeline.iter().map(|s| (s.second, s.connected as f64)),
                CONNECTED.stroke_width(2),
            ))?
            .label("connected (right axis)")
            .legend(legend_key(CONNECTED, 2));
    }
    legend(&mut throughput)?;

    // Latency: seconds without samples have no point rather than a fake 0.
    let millis = |us: u64| (us > 0).then(|| us as f64 / 1000.0);
    let latency_max = headroom(
        timeline
            .iter()
            .map(|s| s.deliver_p99_us.max(s.ack_p99_us) as f64 / 1000.0)
            .fold(0.0, f64::max),
    );
    let mut latency = ChartBuilder::on(&bottom)
        .caption("send -> deliver latency per second", (FAMILY, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .right_y_label_area_size(if connected_max > 0 { 80 } else { 0 })
        .build_cartesian_2d(0..last_second, 0.0..latency_max)?;
    latency
        .configure_mesh()
        .x_desc("second")
        .y_desc("ms")
        .label_style((FAMILY, 14))
        .draw()?;
    // Ack p99 under the delivery lines, wider, for the same reason.
    draw_line(&mut latency, timeline, ACK_P99, 5, "ack p99", |s| {
        millis(s.ack_p99_us)
    })?;
    draw_line(&mut latency, timeline, P50, 2, "deliver p50", |s| {
        millis(s.deliver_p50_us)
    })?;
    draw_line(&mut latency, timeline, P99, 2, "deliver p99", |s| {
        millis(s.deliver_p99_us)
    })?;
    legend(&mut latency)?;
    Ok(())
}

/// One labelled line of `value` per second (seconds without a value are
/// skipped).
fn draw_line<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    timeline: &[Sample],
    color: RGBColor,
    width: u32,
    label: &str,
    value: impl Fn(&Sample) -> Option<f64>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (u64, f64)>,
{
    chart
        .draw_series(LineSeries::new(
            timeline
                .iter()
                .filter_map(|s| value(s).map(|v| (s.second, v))),
            color.stroke_width(width),
        ))?
        .label(label)
        .legend(legend_key(color, width));
    Ok(())
}

/// A series' key in the legend: a short line in its colour and width.
pub(crate) fn legend_key(
    color: RGBColor,
    width: u32,
) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
}

/// The legend box, top left of the panel.
pub(crate) fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}

/// An axis top a little above the data (and never an empty range).
pub(crate) fn headroom(max: f64) -> f64 {
    if max > 0.0 { max * 1.1 } else { 1.0 }
}

/// Draws a chart into a pixel buffer (RGB, `WIDTH` x `HEIGHT`), for tests
/// that look at what was drawn.
#[cfg(test)]
pub(crate) fn render_pixels(
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), BitmapError>,
) -> Vec<u8> {
    register_embedded_font().unwrap();
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root).unwrap();
    root.present().unwrap();
    drop(root);
    pixels
}

/// How many pixels of a rendered chart have exactly `color`.
#[cfg(test)]
pub(crate) fn count(pixels: &[u8], color: RGBColor) -> usize {
    pixels
        .chunks_exact(3)
        .filter(|p| *p == [color.0, color.1, color.2])
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline_report() -> Report {
        let timeline = (1..=5)
            .map(|second| Sample {
                second,
                connected: 1_000 + 10 * second,
                connects: 10,
                acked: 100 * second,
                delivered: 90 * second,
                errors: 0,
                ack_p99_us: 2_000 + 100 * second,
                deliver_p50_us: 1_000 * second,
                deliver_p99_us: 3_000 * second,
            })
            .collect();
        Report {
            scenario: "chat".into(),
            timeline,
            ..Report::default()
        }
    }

    /// Width and height from the IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
        const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        if bytes.get(..8)? != SIGNATURE || bytes.get(12..16)? != b"IHDR" {
            return None;
        }
        let width = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
        let height = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
        Some((width, height))
    }

    #[test]
    fn timeline_renders_to_a_png_of_the_chart_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timeline.png");
        write_png(&timeline_report(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), Some((WIDTH, HEIGHT)));
        assert_eq!(png_size(b"GIF89a not a png at all"), None);
    }

    #[test]
    fn the_chart_draws_lines_and_text_not_a_blank_page() {
        let render = |report: &Report| render_pixels(|root| draw(root, report));
        let pixels = render(&timeline_report());
        let non_white = pixels.chunks_exact(3).filter(|p| *p != [255; 3]).count();
        assert!(non_white > 1000, "only {non_white} pixels drawn");
        // An empty run still draws axes, captions and the legend keys...
        let empty = render(&Report::default());
        assert!(empty.chunks_exact(3).any(|p| p == [0, 0, 0]));
        // ...but every series of a real one draws a line well beyond its
        // legend key.
        for color in [DELIVERED, ACKED, P99, ACK_P99] {
            let (drawn, key_only) = (count(&pixels, color), count(&empty, color));
            assert!(
                drawn > key_only + 200,
                "{color:?}: {drawn} vs {key_only} pixels"
            );
        }
        assert!(count(&pixels, CONNECTED) > 200);
    }
}
