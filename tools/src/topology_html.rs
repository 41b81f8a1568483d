//! The topology test's report: one self-contained HTML file (inline CSS and
//! SVG charts, no scripts, nothing fetched) that opens in any browser.

use std::fmt::Write;

use crate::size::format_size;
use crate::topology::TopologyReport;

const CHART_WIDTH: f64 = 720.0;
const CHART_HEIGHT: f64 = 220.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 30.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The report as HTML.
#[must_use]
pub fn render(report: &TopologyReport) -> String {
    let mut html = String::new();
    let failed = report.requirements.iter().filter(|r| !r.passed).count();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tandem topology report: {src} to {dst}</title>\n<style>{STYLE}</style></head><body>\n<h1>Topology report: {src} &rarr; {dst}</h1>\n<p>Planned mode <b>{mode}</b>; measured for {secs} s ({samples} samples). {verdict}</p>\n",
        src = escape(&report.source),
        dst = escape(&report.destination),
        mode = escape(&report.mode),
        secs = report.elapsed_s.round(),
        samples = report.samples.len(),
        verdict = if failed == 0 {
            "<span class=\"pass\">Every requirement is met.</span>".to_owned()
        } else {
            format!("<span class=\"fail\">{failed} requirement(s) failed.</span>")
        },
    );
    requirements_table(&mut html, report);
    recommendations(&mut html, report);
    html.push_str("<h2>Source write rate</h2>\n");
    let _ = writeln!(html, "<p>Measured from {}.</p>", escape(&report.workload_method));
    let rates: Vec<(f64, f64)> =
        report.samples.iter().map(|s| (s.second as f64, s.write_bytes_per_s / f64::from(1 << 20))).collect();
    html.push_str(&line_chart("write-rate", &rates, "s", "MiB/s"));
    html.push_str("<h2>Round trip to the destination</h2>\n");
    html.push_str(&bar_chart("round-trip", &report.round_trip_us_buckets, "us"));
    let _ = writeln!(
        html,
        "<p>p50 {} us, p99 {} us, {} round trips of 64 bytes.</p>",
        report.round_trip_us_p50,
        report.round_trip_us_p99,
        report.round_trip_us_buckets.iter().map(|(_, c)| c).sum::<u64>()
    );
    html.push_str("<h2>Source log write latency</h2>\n");
    let log: Vec<(f64, f64)> =
        report.samples.iter().filter_map(|s| s.log_write_latency_us.map(|us| (s.second as f64, us))).collect();
    if log.is_empty() {
        html.push_str("<p>The log was idle during the measurement (no writes reached the source).</p>\n");
    } else {
        html.push_str(&line_chart("log-latency", &log, "s", "us"));
    }
    devices(&mut html, report);
    html.push_str("</body></html>\n");
    html
}

const STYLE: &str = "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}.pass{color:#1a7f37;font-weight:bold}.fail{color:#c62828;font-weight:bold}svg{background:#fafafa;border:1px solid #ddd}.axis{stroke:#888}.line{fill:none;stroke:#1565c0;stroke-width:2}.bar{fill:#1565c0}text{font-size:11px;fill:#444}";

fn requirements_table(html: &mut String, report: &TopologyReport) {
    html.push_str("<h2>Requirements</h2>\n<table><tr><th></th><th>Requirement</th><th>Measured</th><th>Limit</th><th>Fix</th></tr>\n");
    for r in &report.requirements {
        let _ = writeln!(
            html,
            "<tr><td class=\"{class}\">{verdict}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.name),
            escape(&r.measured),
            escape(&r.limit),
            escape(&r.fix),
            class = if r.passed { "pass" } else { "fail" },
            verdict = if r.passed { "PASS" } else { "FAIL" },
        );
    }
    html.push_str("</table>\n");
}

fn recommendations(html: &mut String, report: &TopologyReport) {
    html.push_str("<h2>Recommendations</h2>\n<ul>\n");
    let _ = writeln!(
        html,
        "<li>Log size: <b>{}</b> ({}). The source's log is {} now.</li>",
        format_size(report.recommended_log_bytes),
        escape(&report.log_size_reasoning),
        format_size(report.current_log_bytes)
    );
    match (report.initial_sync_estimate_s, report.bandwidth_bytes_per_s) {
        (Some(seconds), Some(bandwidth)) => {
            let _ = writeln!(
                html,
                "<li>Initial sync: about <b>{:.1} s</b> ({} of allocated data on the source volumes at the measured {}/s; holes are not sent).</li>",
                seconds,
                format_size(report.initial_sync_bytes),
                format_size(bandwidth as u64)
            );
        }
        _ => html.push_str("<li>Initial sync: not estimated (the bandwidth could not be measured).</li>\n"),
    }
    let _ = writeln!(
        html,
        "<li>Peak write rate: {}/s; bandwidth to the destination: {}.</li>\n</ul>",
        format_size(report.peak_write_bytes_per_s as u64),
        report
            .bandwidth_bytes_per_s
            .map_or_else(|| "not measured".to_owned(), |b| format!("{}/s", format_size(b as u64)))
    );
}

fn devices(html: &mut String, report: &TopologyReport) {
    html.push_str("<h2>Devices</h2>\n<table><tr><th>Side</th><th>Path</th><th>Device</th><th>Latency (4 KiB)</th><th>Method</th></tr>\n");
    for (side, devices) in [("source", &report.source_devices), ("destination", &report.destination_devices)] {
        let Some(devices) = devices else { continue };
        for (role, facts) in std::iter::once(("log", &devices.log)).chain(devices.volumes.iter().map(|v| ("volume", v)))
        {
            let _ = writeln!(
                html,
                "<tr><td>{side} {role}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&facts.path),
                escape(&facts.device),
                facts.latency_us_avg.map_or_else(String::new, |us| format!(
                    "avg {us:.0} us, p99 {} us",
                    facts.latency_us_p99.unwrap_or(0)
                )),
                escape(&facts.latency_method)
            );
        }
    }
    html.push_str("</table>\n");
}

/// Scales `value` in `0..=max` onto `0..=span`.
fn scale(value: f64, max: f64, span: f64) -> f64 {
    if max <= 0.0 {
        0.0
    } else {
        value / max * span
    }
}

fn axes(svg: &mut String, max_y: f64, y_unit: &str, x_label: &str) {
    let plot_bottom = CHART_HEIGHT - MARGIN_BOTTOM;
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{MARGIN_LEFT}\" y1=\"10\" x2=\"{MARGIN_LEFT}\" y2=\"{plot_bottom}\"/><line class=\"axis\" x1=\"{MARGIN_LEFT}\" y1=\"{plot_bottom}\" x2=\"{CHART_WIDTH}\" y2=\"{plot_bottom}\"/><text x=\"4\" y=\"16\">{max_y:.1} {y_unit}</text><text x=\"4\" y=\"{plot_bottom}\">0</text><text x=\"{}\" y=\"{}\">{}</text>",
        CHART_WIDTH - 140.0,
        CHART_HEIGHT - 8.0,
        escape(x_label)
    );
}

/// A line through `points` (x, y), both axes from zero.
fn line_chart(id: &str, points: &[(f64, f64)], x_unit: &str, y_unit: &str) -> String {
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let (width, height) = (CHART_WIDTH - MARGIN_LEFT - 10.0, CHART_HEIGHT - MARGIN_BOTTOM - 10.0);
    let mut svg = format!("<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{CHART_WIDTH}\" height=\"{CHART_HEIGHT}\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\">");
    axes(&mut svg, max_y, y_unit, &format!("time ({max_x:.0} {x_unit})"));
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!("{:.1},{:.1}", MARGIN_LEFT + scale(*x, max_x, width), 10.0 + height - scale(*y, max_y, height))
        })
        .collect();
    let _ = writeln!(svg, "<polyline class=\"line\" points=\"{}\"/></svg>", path.join(" "));
    svg
}

/// One bar per (upper bound, count) bucket.
fn bar_chart(id: &str, buckets: &[(u64, u64)], unit: &str) -> String {
    let max_count = buckets.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let (width, height) = (CHART_WIDTH - MARGIN_LEFT - 10.0, CHART_HEIGHT - MARGIN_BOTTOM - 10.0);
    let slot = width / buckets.len().max(1) as f64;
    let mut svg = format!("<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{CHART_WIDTH}\" height=\"{CHART_HEIGHT}\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\">");
    axes(&mut svg, max_count, "round trips", &format!("upper bound ({unit})"));
    for (index, (bound, count)) in buckets.iter().enumerate() {
        let bar_height = scale(*count as f64, max_count, height);
        let x = MARGIN_LEFT + index as f64 * slot;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bar_height:.1}\"><title>&le; {bound} {unit}: {count}</title></rect><text x=\"{:.1}\" y=\"{}\">{bound}</text>",
            x + 1.0,
            10.0 + height - bar_height,
            (slot - 2.0).max(1.0),
            x + 1.0,
            CHART_HEIGHT - MARGIN_BOTTOM + 12.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_charts_scale_into_their_box() {
        assert_eq!(escape("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
        let chart = line_chart("c", &[(0.0, 0.0), (10.0, 5.0)], "s", "MiB/s");
        assert!(chart.starts_with("<svg id=\"c\""));
        assert!(chart.contains(&format!("{MARGIN_LEFT:.1},{:.1}", CHART_HEIGHT - MARGIN_BOTTOM)), "{chart}");
        assert!(chart.contains(&format!("{:.1},10.0", CHART_WIDTH - 10.0)), "{chart}");
        let bars = bar_chart("b", &[(100, 3), (200, 6)], "us");
        assert_eq!(bars.matches("<rect").count(), 2);
    }
}
