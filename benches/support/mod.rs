//! What the benchmarks share: run count, medians, a section filter and the Markdown table
//! (`cache`, `eviction`; `fanout` and `bench-peers` use the median).
#![allow(dead_code, unreachable_pub)]

/// Repetitions per measurement: `BENCH_RUNS` (if it is a positive number: a median of no
/// runs does not exist), else `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(default)
}

/// Throughput in GB/s of `bytes` moved in `d`.
pub fn gbps(bytes: usize, d: std::time::Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Whether this process was started by `cargo bench` (which passes `--bench`); under
/// `cargo test --benches` the measurements are skipped.
pub fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Whether the section `name` was asked for: `cargo bench --bench X -- hit disk` runs only the
/// sections whose names contain one of the words; no words run everything.
pub fn wanted(name: &str) -> bool {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
}

/// A named benchmark section, adding its rows to the table.
pub type Section<'a> = (&'a str, fn(&mut Table));

/// Runs the wanted ones of `sections` in order, then prints their table.
pub fn run_sections(sections: &[Section<'_>]) {
    let mut rows = Table::default();
    for (name, section) in sections {
        if wanted(name) {
            section(&mut rows);
        }
    }
    rows.print();
}

/// Rows of `case | median | unit | ratio to baseline`, echoed to stderr as they come.
#[derive(Default)]
pub struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    pub fn row(&mut self, name: &str, value: f64, unit: &str, ratio: Option<f64>) {
        let value = if value.abs() < 0.1 {
            format!("{value:.4}")
        } else {
            format!("{value:.2}")
        };
        let r = [
            name.to_owned(),
            value,
            unit.to_owned(),
            ratio.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×")),
        ];
        eprintln!("{}", r.join(" | "));
        self.rows.push(r);
    }

    pub fn print(&self) {
        println!("\n| case | median | unit | ratio to baseline |\n| --- | --- | --- | --- |");
        for r in &self.rows {
            println!("| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]);
        }
    }
}
