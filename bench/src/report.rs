//! Statistics and the report (stdout table, plus docs-ready markdown).

use std::path::Path;
use std::time::Duration;

#[derive(Clone)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) n: usize,
}

pub(crate) fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stat {
        median: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) vtpmd: Stat,
    pub(crate) swtpm: Stat,
    pub(crate) extra: Vec<(String, Stat)>,
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(crate) fn report(rows: &[Row], root: &Path, smoke: bool) {
    println!(
        "\n{:<44} {:>5} {:>10} {:>10} {:>10} {:>10} {:>7}  other (p50)",
        "row", "unit", "vtpmd p50", "swtpm p50", "vtpmd p99", "swtpm p99", "ratio"
    );
    let mut json = Vec::new();
    for r in rows {
        let ratio = r.vtpmd.median / r.swtpm.median;
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(k, s)| format!("{k} {:.1}", s.median))
            .collect();
        println!(
            "{:<44} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.2}  {}",
            r.name,
            r.unit,
            r.vtpmd.median,
            r.swtpm.median,
            r.vtpmd.p99,
            r.swtpm.p99,
            ratio,
            extra.join(", ")
        );
        let mut row = serde_json::json!({
            "row": r.name, "unit": r.unit, "iterations": r.vtpmd.n,
            "vtpmd": {"median": r.vtpmd.median, "p99": r.vtpmd.p99},
            "swtpm": {"median": r.swtpm.median, "p99": r.swtpm.p99},
            "ratio_vtpmd_over_swtpm": ratio,
        });
        for (k, s) in &r.extra {
            row[k.as_str()] = serde_json::json!({"median": s.median, "p99": s.p99});
            if k == "in-process" {
                row["vtpmd_overhead_us"] = (r.vtpmd.median - s.median).into();
                row["swtpm_overhead_us"] = (r.swtpm.median - s.median).into();
            }
        }
        json.push(row);
    }
    let dir = root.join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(if smoke {
        "report-smoke.json"
    } else if std::env::var_os("VTPM_BENCH_ONLY").is_some() {
        "report-partial.json"
    } else {
        "report.json"
    });
    std::fs::write(&file, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nreport: {}", file.display());
}
