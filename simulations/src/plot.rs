//! `--plot FILE.svg`: the dissemination curve (fraction of nodes informed over time) and the
//! histogram of detection times, side by side in one SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

/// Draws `report`'s curve and histogram into the SVG file at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "{} · {} nodes · seed {} · loss {}%",
        report.scenario,
        report.nodes,
        report.seed,
        report.loss * 100.0
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    curve(report, &left)?;
    histogram(report, &right)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

fn curve<DB: DrawingBackend>(
    report: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let points = &report.dissemination_curve;
    let max_t = points.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "dissemination: fraction of nodes informed",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..max_t, 0.0..1.02)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the write (or the crash)")
        .y_desc("fraction informed")
        .draw()
        .map_err(err)?;
    if points.is_empty() {
        area.draw(&Text::new(
            "no dissemination measured",
            (200, 220),
            ("sans-serif", 14),
        ))
        .map_err(err)?;
        return Ok(());
    }
    // A step curve: each node is informed at its own instant.
    let mut steps = Vec::with_capacity(points.len() * 2);
    let mut last = 0.0;
    for &(t, f) in points {
        steps.push((t, last));
        steps.push((t, f));
        last = f;
    }
    steps.push((max_t, last));
    chart
        .draw_series(LineSeries::new(steps, BLUE.stroke_width(2)))
        .map_err(err)?;
    Ok(())
}

fn histogram<DB: DrawingBackend>(
    report: &Report,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let times = &report.detection_times;
    let max_t = times.iter().copied().fold(0.0f64, f64::max);
    let bins = 30usize;
    let width = (max_t / bins as f64).max(0.05);
    let mut counts = vec![0usize; bins + 1];
    for t in times {
        counts[((t / width) as usize).min(bins)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption("detection time per node", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..width * (bins + 1) as f64, 0usize..top + top / 10 + 1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds after the crash (or leave)")
        .y_desc("nodes")
        .draw()
        .map_err(err)?;
    if times.is_empty() {
        area.draw(&Text::new(
            "no detection measured",
            (200, 220),
            ("sans-serif", 14),
        ))
        .map_err(err)?;
        return Ok(());
    }
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(k, c)| {
                    let x0 = k as f64 * width;
                    Rectangle::new([(x0, 0), (x0 + width, *c)], RED.mix(0.6).filled())
                }),
        )
        .map_err(err)?;
    Ok(())
}
