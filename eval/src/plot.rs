//! The PNG: foreground latency over time, one panel per kind of outage, one series per mode,
//! Wi-Fi outages shaded, failed requests marked at the top.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::Run;

/// Fonts tried for the text, in order.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const COLORS: [RGBColor; 5] = [
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(230, 159, 0),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
];

fn load_font() -> Result<(), String> {
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or("no DejaVuSans.ttf found (apt install fonts-dejavu-core)")?;
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "cannot load DejaVuSans.ttf".to_string())
}

/// Draws `runs` into `path`.
pub fn draw(runs: &[Run], path: &Path) -> Result<(), String> {
    load_font()?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let outages: Vec<String> = {
        let mut v: Vec<String> = runs.iter().map(|r| r.outage.clone()).collect();
        v.dedup();
        v
    };
    let height = 420 * outages.len().max(1) as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((outages.len().max(1), 1));
    let max_t = runs.iter().map(|r| r.duration_s).fold(1.0, f64::max);
    let top = 30_000.0;
    for (panel, outage) in panels.iter().zip(&outages) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("Foreground latency, Wi-Fi outages: {outage}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_t, (10f64..top).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("latency (ms)")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        let shaded = RGBColor(225, 225, 225).filled();
        if let Some(r) = runs.iter().find(|r| &r.outage == outage) {
            chart
                .draw_series(r.outages.iter().map(|&(a, b)| Rectangle::new([(a, 10.0), (b, top)], shaded)))
                .map_err(|e| err(&e))?;
        }
        for (i, r) in runs.iter().filter(|r| &r.outage == outage).enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> =
                r.fg.iter().filter_map(|s| s.latency_ms.map(|l| (s.at, l.clamp(10.0, top)))).collect();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(format!("{} (mean {:.0} ms, {} failed)", r.mode, r.latency.mean, r.latency.failures))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled())))
                .map_err(|e| err(&e))?;
            let failed: Vec<(f64, f64)> =
                r.fg.iter().filter(|s| s.latency_ms.is_none()).map(|s| (s.at, top * 0.8)).collect();
            chart
                .draw_series(failed.iter().map(|&p| Cross::new(p, 5, color.stroke_width(2))))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
