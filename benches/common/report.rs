//! A benchmark's figures as files: `target/bench-results/<name>.csv` (one row per series and
//! category) and `<name>.png`, a grouped bar chart of the same figures — cachesync beside its
//! baseline, category by category (latency percentiles, rounds, connection counts).
//!
//! The PNG's text is drawn with DejaVu Sans, read from Debian's `fonts-dejavu-core`
//! (`deploy/dev/install-deps.sh` installs it); without it the CSV is still written and
//! the PNG is skipped with a message saying how to install the font.

use std::path::PathBuf;

use plotters::prelude::*;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Figures of one benchmark.
pub struct Report {
    name: String,
    title: String,
    unit: String,
    /// (series, category, value), in the order added.
    rows: Vec<(String, String, f64)>,
}

impl Report {
    /// `name` names the files; `title` and `unit` label the chart.
    pub fn new(name: &str, title: &str, unit: &str) -> Report {
        Report {
            name: name.to_string(),
            title: title.to_string(),
            unit: unit.to_string(),
            rows: Vec::new(),
        }
    }

    /// One figure: `series` (e.g. "cachesync", "redis-server") at `category` (e.g. "p99").
    pub fn add(&mut self, series: &str, category: &str, value: f64) {
        self.rows.push((series.to_string(), category.to_string(), value));
    }

    /// A latency's p50, p99 and p999 in µs under `series`, as categories "`at` p50" and so on.
    pub fn add_latency(&mut self, series: &str, at: &str, lat: &super::Lat) {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            self.add(series, &format!("{at} {name}"), lat.p(q));
        }
    }

    /// Where the files go: `target/bench-results` of this checkout.
    pub fn dir() -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        target.join("bench-results")
    }

    /// Writes the CSV and draws the PNG; prints where they are.
    pub fn write(&self) {
        let dir = Self::dir();
        std::fs::create_dir_all(&dir).expect("create target/bench-results");
        let csv = dir.join(format!("{}.csv", self.name));
        let mut text = format!("series,category,{}\n", csv_field(&self.unit));
        for (s, c, v) in &self.rows {
            text.push_str(&format!("{},{},{v}\n", csv_field(s), csv_field(c)));
        }
        std::fs::write(&csv, text).expect("write the CSV");
        let png = dir.join(format!("{}.png", self.name));
        match self.draw(&png) {
            Ok(()) => println!("figures: {} and {}", csv.display(), png.display()),
            Err(e) => println!("figures: {} (no PNG: {e})", csv.display()),
        }
    }

    /// The series, in the order first added.
    fn series(&self) -> Vec<&str> {
        distinct(self.rows.iter().map(|r| r.0.as_str()))
    }

    /// The categories, in the order first added.
    fn categories(&self) -> Vec<&str> {
        distinct(self.rows.iter().map(|r| r.1.as_str()))
    }

    fn draw(&self, path: &std::path::Path) -> Result<(), String> {
        register_font_once()?;
        let (series, categories) = (self.series(), self.categories());
        // Figures spanning more than 50× (latency tails) are drawn on a log scale: the bars'
        // heights are log10 of the values, the axis labelled with the values themselves.
        let positive = || self.rows.iter().map(|r| r.2).filter(|v| *v > 0.0);
        let max = positive().fold(f64::MIN_POSITIVE, f64::max);
        let min = positive().fold(max, f64::min);
        let log = max / min > 50.0;
        let (bottom, top) = if log {
            (min.log10().floor(), max.log10().ceil())
        } else {
            (0.0, max * 1.15)
        };
        let height = |v: f64| if log { v.max(min).log10() } else { v };
        let width = (160 + 90 * categories.len() * series.len().max(1)).clamp(640, 1600) as u32;
        let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..categories.len() as f64, bottom..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(categories.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                // Label the middle of each category's slot only.
                if (x - i as f64 - 0.5).abs() < 1e-6 {
                    categories.get(i).map(|c| c.to_string()).unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                let v = if log { 10f64.powf(*y) } else { *y };
                if max >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .y_desc(if log {
                format!("{} (log scale)", self.unit)
            } else {
                self.unit.clone()
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        let n = series.len().max(1) as f64;
        let bar = 0.8 / n;
        for (si, s) in series.iter().enumerate() {
            let color = Palette99::pick(si).to_rgba();
            let bars = self.rows.iter().filter(|r| r.0 == *s).filter_map(|(_, c, v)| {
                let ci = categories.iter().position(|x| x == c)? as f64;
                let x0 = ci + 0.1 + bar * si as f64;
                Some(Rectangle::new(
                    [(x0, bottom), (x0 + bar * 0.95, height(*v))],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(*s)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn register_font_once() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("cannot read {FONT} ({e}); install it with `apt-get install fonts-dejavu-core`"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{FONT} is not a font plotters can use"))
    })
    .clone()
}
