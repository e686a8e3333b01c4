//! PNG plots of an evaluation report, drawn with plotters: recall vs keys read per layer, and the
//! passkey grid. Text is drawn with DejaVu Sans fetched into the cache (no system fonts needed).

use super::{LayerRow, NihCell, Res};
use plotters::prelude::*;
use std::path::Path;

/// Registers the fetched DejaVu Sans as plotters' `sans-serif` (once per process).
pub fn register_font() -> Res<()> {
    let path = saap::models::fetch::font()?;
    let bytes = std::fs::read(&path)?;
    // plotters keeps fonts for the whole process; the leak is one font file, once.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
    Ok(())
}

/// One point per layer: indexed keys read (%) against the share of the indexed attention mass
/// read, for Saap, nearest centroid, a perfect classifier over the same partitions and the
/// perfect top-k selector at Saap's budget.
pub fn recall_vs_keys_read(layers: &[LayerRow], title: &str, path: &Path) -> Res<()> {
    let points = |f: &dyn Fn(&LayerRow) -> (f64, f64)| layers.iter().map(f).collect::<Vec<_>>();
    let saap = points(&|l| (100.0 * l.saap.indexed_selectivity, l.saap.indexed_recall));
    let nearest = points(&|l| {
        let n = &l.nearest_centroid;
        (100.0 * n.indexed_selectivity, n.indexed_recall)
    });
    let perfect = points(&|l| {
        let s = &l.saap;
        (
            100.0 * s.partition_oracle_indexed_selectivity,
            s.partition_oracle_indexed_recall,
        )
    });
    let top_k = points(&|l| {
        (
            100.0 * l.saap.indexed_selectivity,
            l.saap.oracle_indexed_recall,
        )
    });
    let x_max = [&saap, &nearest, &perfect, &top_k]
        .iter()
        .flat_map(|s| s.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.05;

    let root = BitMapBackend::new(path, (900, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 17))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)?;
    chart
        .configure_mesh()
        .x_desc("indexed keys read (%)")
        .y_desc("share of the indexed attention mass read")
        .label_style(("sans-serif", 14))
        .draw()?;
    let gray = RGBColor(128, 128, 128);
    chart
        .draw_series(saap.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))?
        .label("Saap (trained classifier)")
        .legend(|p| Circle::new(p, 5, BLUE.filled()));
    chart
        .draw_series(
            nearest
                .iter()
                .map(|&p| Cross::new(p, 5, RED.stroke_width(2))),
        )?
        .label("nearest centroid (symmetric)")
        .legend(|p| Cross::new(p, 5, RED.stroke_width(2)));
    // Reports from before the perfect classifier was measured hold zeros there.
    if perfect.iter().any(|p| p.0 > 0.0) {
        chart
            .draw_series(
                perfect
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 6, GREEN.filled())),
            )?
            .label("perfect classifier (best ℓ partitions)")
            .legend(|p| TriangleMarker::new(p, 6, GREEN.filled()));
    }
    chart
        .draw_series(top_k.iter().map(|&p| Circle::new(p, 3, gray.filled())))?
        .label("perfect top-k keys at Saap's budget")
        .legend(move |p| Circle::new(p, 3, gray.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One panel per mode: prompt length (rows) × needle depth (columns), green where the greedy
/// answer contains the passkey, red where it does not.
pub fn passkey_grid(cells: &[NihCell], modes: &[String], title: &str, path: &Path) -> Res<()> {
    let mut lengths: Vec<usize> = cells.iter().map(|c| c.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut depths: Vec<f64> = cells.iter().map(|c| c.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();

    let size = (
        300 * modes.len() as u32 + 60,
        140 + 60 * lengths.len() as u32,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 17))?;
    for (panel, mode) in root.split_evenly((1, modes.len())).iter().zip(modes) {
        let mut chart = ChartBuilder::on(panel)
            .caption(mode, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                // A segmented 0..n has n + 1 segments (n included).
                (0..depths.len() - 1).into_segmented(),
                (0..lengths.len() - 1).into_segmented(),
            )?;
        // Labels at cell centres only.
        let label = |v: &SegmentValue<usize>, names: &dyn Fn(usize) -> Option<String>| match v {
            SegmentValue::CenterOf(i) => names(*i).unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("needle depth")
            .y_desc("prompt tokens")
            .x_labels(depths.len() + 1)
            .y_labels(lengths.len() + 1)
            .x_label_formatter(&|x| label(x, &|i| depths.get(i).map(f64::to_string)))
            .y_label_formatter(&|y| label(y, &|i| lengths.get(i).map(usize::to_string)))
            .label_style(("sans-serif", 13))
            .draw()?;
        for cell in cells {
            let col = depths.iter().position(|&d| d == cell.depth).unwrap_or(0);
            let row = lengths.iter().position(|&l| l == cell.length).unwrap_or(0);
            let color = match cell.answers.iter().find(|a| &a.0 == mode) {
                Some((_, _, true)) => GREEN.mix(0.7),
                Some((_, _, false)) => RED.mix(0.7),
                None => RGBColor(200, 200, 200).mix(1.0),
            };
            let corners = [
                (SegmentValue::Exact(col), SegmentValue::Exact(row)),
                (SegmentValue::Exact(col + 1), SegmentValue::Exact(row + 1)),
            ];
            chart.draw_series([
                Rectangle::new(corners.clone(), color.filled()),
                Rectangle::new(corners, WHITE.stroke_width(3)),
            ])?;
        }
    }
    root.present()?;
    Ok(())
}
