//! The SVG chart: late joiner's time to first byte, and fan-out throughput, per system.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::{READERS, Row, find};

/// One colour per system, the same in both panels.
fn color_of(short: &str) -> RGBColor {
    match short {
        "sc memory" => COLORS[0],
        "moka" => COLORS[1],
        "foyer" => COLORS[2],
        "sc disk" => COLORS[3],
        _ => COLORS[4],
    }
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

pub(crate) fn draw(path: &Path, rows: &[Row]) -> Result<()> {
    draw_inner(path, rows).map_err(|e| anyhow!("chart: {e}"))
}

fn draw_inner(path: &Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(520);

    // Left: late joiner, time to first byte (log scale).
    let systems = [
        ("streamcache memory", "sc memory"),
        ("streamcache disk", "sc disk"),
        ("moka", "moka"),
        ("foyer (hybrid)", "foyer"),
        ("cacache", "cacache"),
    ];
    let ttfb: Vec<(&str, f64)> = systems
        .iter()
        .filter_map(|(s, short)| {
            find(rows, "late joiner: time to first byte", s).map(|r| (*short, r.value))
        })
        .collect();
    let n = ttfb.len().max(1);
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "Late joiner: time to first byte (ms, log)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n as f64, (0.001f64..10_000f64).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ms after the request (production: ~400 ms)")
        .draw()?;
    for (i, (name, v)) in ttfb.iter().enumerate() {
        let x = i as f64;
        let v = v.max(0.001);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.15, 0.001), (x + 0.85, v)],
            color_of(name).filled(),
        )))?;
        let value = if v < 1.0 {
            format!("{:.0} µs", v * 1e3)
        } else {
            format!("{v:.0} ms")
        };
        chart.draw_series([
            Text::new((*name).to_owned(), (x + 0.12, v * 6.0), ("sans-serif", 14)),
            Text::new(value, (x + 0.12, v * 2.2), ("sans-serif", 14)),
        ])?;
    }

    // Right: fan-out aggregate GB/s, grouped by N.
    let fan: [(&str, &str, &str); 5] = [
        (
            "fan-out memory",
            "streamcache memory",
            "streamcache memory (live)",
        ),
        ("fan-out memory", "moka", "moka (waits for whole value)"),
        (
            "fan-out memory",
            "foyer (hybrid)",
            "foyer (waits for whole value)",
        ),
        (
            "fan-out disk",
            "streamcache disk",
            "streamcache disk (live)",
        ),
        ("fan-out disk", "cacache", "cacache (reads after commit)"),
    ];
    let mut max = 1.0f64;
    let mut series = Vec::new();
    for (w, s, label) in fan {
        let vals: Vec<Option<f64>> = READERS
            .iter()
            .map(|n| find(rows, w, &format!("{s}, N={n}")).map(|r| r.value))
            .collect();
        for v in vals.iter().flatten() {
            max = max.max(*v);
        }
        series.push((label, vals));
    }
    let baselines: Vec<(&str, f64)> = [
        ("fan-out memory", "copy baseline (1 thread)"),
        ("fan-out disk", "page-cache read baseline (1 thread)"),
    ]
    .into_iter()
    .filter_map(|(w, label)| {
        rows.iter()
            .find(|r| r.workload == w && r.system.contains("baseline"))
            .map(|r| (label, r.value))
    })
    .collect();
    for (_, b) in &baselines {
        max = max.max(*b);
    }
    let groups = READERS.len();
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "Fan-out: aggregate GB/s, 256 MiB, N live readers",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..groups as f64, 0f64..max * 1.8)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("GB/s (all readers together)")
        .draw()?;
    chart.draw_series((0..groups).map(|g| {
        Text::new(
            format!("N = {}", READERS[g]),
            (g as f64 + 0.4, max * 1.08),
            ("sans-serif", 15),
        )
    }))?;
    let k = series.len() as f64;
    let width = 0.8 / k;
    for (j, (label, vals)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(g, v)| {
                v.map(|v| {
                    let x0 = g as f64 + 0.1 + j as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
                })
            }))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    for (i, (label, b)) in baselines.iter().enumerate() {
        let style = if i == 0 {
            BLACK
        } else {
            RGBColor(120, 120, 120)
        };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, *b), (groups as f64, *b)],
                6,
                4,
                style.stroke_width(2),
            ))?
            .label(format!("{label}: {b:.1}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], style.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}
