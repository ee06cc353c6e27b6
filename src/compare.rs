//! Side-by-side anisotropy of several embedding sets: metrics, JSON/Markdown tables and plots.
//! Inputs arrive as embeddings (the CLI embeds model columns); this module measures and draws.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::io::{write_atomic, write_json};
use crate::metrics::{anisotropy, covariance_spectrum, normalize_rows, Anisotropy, Embeddings};
use crate::plot::{circle_panels, histogram, spectrum, Series};

/// One column: `n` sentence embeddings and, optionally, embeddings of positive pairs.
pub struct Column {
    pub name: String,
    pub dim: usize,
    pub sentences: Vec<f32>,
    pub pairs: Option<(Vec<f32>, Vec<f32>)>,
}

impl Column {
    pub fn n(&self) -> usize {
        self.sentences.len() / self.dim.max(1)
    }
}

#[derive(Debug, Serialize)]
pub struct ColumnResult {
    pub name: String,
    pub n: usize,
    pub dim: usize,
    pub metrics: Anisotropy,
}

/// Random pairs of distinct rows whose cosine the histogram shows.
const COSINE_PAIRS: usize = 20_000;

/// What the plots show of one column.
struct Shapes {
    cosines: Vec<f64>,
    distances: Option<Vec<f64>>,
    spectrum: Vec<f64>,
    circle: Vec<[f64; 2]>,
}

/// Measure every column, write `compare.json`, `compare.md` and the plots into `out`.
/// Returns the results and the plot files written.
pub fn compare(columns: &[Column], out: &Path, seed: u64) -> Result<(Vec<ColumnResult>, Vec<PathBuf>)> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut results = Vec::new();
    let mut shapes = Vec::new();
    for col in columns {
        let (result, shape) = measure(col, seed)?;
        results.push(result);
        shapes.push(shape);
    }
    let files = plots(columns, &shapes, out)?;
    write_json(&out.join("compare.json"), &results)?;
    write_atomic(&out.join("compare.md"), markdown(&results).as_bytes())?;
    Ok((results, files))
}

/// One column's metrics and plot data: cosines of random pairs, distances of its positive
/// pairs, its covariance spectrum and its rows on the top two directions of XᵀX.
fn measure(col: &Column, seed: u64) -> Result<(ColumnResult, Shapes)> {
    let (n, dim) = (col.n(), col.dim);
    fn emb(data: &[f32], dim: usize) -> Embeddings<'_> {
        Embeddings { data, n: data.len() / dim.max(1), dim }
    }
    let pairs = col.pairs.as_ref().map(|(a, b)| (emb(a, dim), emb(b, dim)));
    let metrics =
        anisotropy(emb(&col.sentences, dim), pairs).map_err(|e| Error::Invalid(format!("{}: {e}", col.name)))?;
    let unit = normalize_rows(&col.sentences, dim)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let cosines = (0..COSINE_PAIRS.min(n * (n - 1) / 2))
        .map(|_| {
            let i = rng.gen_range(0..n);
            let j = (i + rng.gen_range(1..n)) % n;
            dot(&unit[i * dim..(i + 1) * dim], &unit[j * dim..(j + 1) * dim])
        })
        .collect();
    let distances = match &col.pairs {
        Some((a, b)) => {
            let (a, b) = (normalize_rows(a, dim)?, normalize_rows(b, dim)?);
            let dist = |(x, y): (&[f64], &[f64])| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f64>().sqrt();
            Some(a.chunks_exact(dim).zip(b.chunks_exact(dim)).map(dist).collect())
        }
        None => None,
    };
    let (eigvals, _) = covariance_spectrum(&unit, n, dim);
    let total: f64 = eigvals.iter().sum::<f64>().max(1e-300);
    let spectrum = eigvals.iter().map(|v| v / total).collect();
    // The circle picture: rows projected, uncentred, on the top two eigenvectors of XᵀX, so a
    // cone (a shared mean direction) shows as a bunched arc and a uniform spread as a ring.
    let x = nalgebra::DMatrix::from_row_slice(n, dim, &unit);
    let eig = nalgebra::SymmetricEigen::new(x.transpose() * &x);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let top = |k: usize| eig.eigenvectors.column(order[k.min(dim - 1)]).clone_owned();
    let proj = &x * nalgebra::DMatrix::from_columns(&[top(0), top(1)]);
    let circle = proj.row_iter().map(|r| [r[0], r[1]]).collect();
    let result = ColumnResult { name: col.name.clone(), n, dim, metrics };
    Ok((result, Shapes { cosines, distances, spectrum, circle }))
}

/// The four plots (SVG and PNG each): cosine and alignment histograms, circle panels, spectra.
fn plots(columns: &[Column], shapes: &[Shapes], out: &Path) -> Result<Vec<PathBuf>> {
    let plot_err = |e: Error| Error::Context { msg: "plot".into(), inner: Box::new(e) };
    let series = |f: &dyn Fn(&Shapes) -> Option<&Vec<f64>>| -> Vec<Series> {
        columns.iter().zip(shapes).filter_map(|(c, s)| f(s).map(|values| Series { name: &c.name, values })).collect()
    };
    let mut files = Vec::new();
    let cosines = series(&|s| Some(&s.cosines));
    let title = "Cosine similarity of random sentence pairs";
    files
        .extend(histogram(&out.join("cosine"), title, "cosine similarity", &cosines, -1.0, 1.0, 80).map_err(plot_err)?);
    let distances = series(&|s| s.distances.as_ref());
    if !distances.is_empty() {
        let title = "Distance of positive pairs (alignment)";
        files.extend(
            histogram(&out.join("alignment"), title, "||f(x) - f(y)||", &distances, 0.0, 2.0, 80).map_err(plot_err)?,
        );
    }
    let panels: Vec<(&str, &[[f64; 2]])> =
        columns.iter().zip(shapes).map(|(c, s)| (c.name.as_str(), s.circle.as_slice())).collect();
    let title = "Top-2 directions of XᵀX, on the circle";
    files.extend(circle_panels(&out.join("circle"), title, &panels, 10.0).map_err(plot_err)?);
    let spectra = series(&|s| Some(&s.spectrum));
    files.extend(spectrum(&out.join("spectrum"), "Covariance eigenvalue spectrum", &spectra).map_err(plot_err)?);
    Ok(files)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

type Getter = fn(&Anisotropy) -> Option<f64>;

const ROWS: [(&str, Getter); 7] = [
    ("sentences", |_| None),
    ("alignment (alpha=2)", |m| m.alignment),
    ("uniformity (t=2)", |m| Some(m.uniformity)),
    ("mean cosine", |m| Some(m.mean_cosine)),
    ("isotropy I(W)", |m| Some(m.isotropy)),
    ("effective rank", |m| Some(m.effective_rank)),
    ("top PC variance", |m| Some(m.top_pc_variance)),
];

fn cells(results: &[ColumnResult]) -> Vec<(String, Vec<String>)> {
    ROWS.iter()
        .map(|(label, get)| {
            let vals = results
                .iter()
                .map(|r| match (*label, get(&r.metrics)) {
                    ("sentences", _) => format!("{} x {}", r.n, r.dim),
                    (_, Some(v)) => format!("{v:.4}"),
                    (_, None) => "-".into(),
                })
                .collect();
            (label.to_string(), vals)
        })
        .collect()
}

/// The comparison as a plain-text table for the terminal.
pub fn table(results: &[ColumnResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(8).max(12) + 2;
    let mut out = format!("{:<22}", "metric");
    for r in results {
        out += &format!("{:>width$}", r.name);
    }
    out.push('\n');
    for (label, vals) in cells(results) {
        out += &format!("{label:<22}");
        for v in vals {
            out += &format!("{v:>width$}");
        }
        out.push('\n');
    }
    out
}

fn markdown(results: &[ColumnResult]) -> String {
    let mut out = String::from("| metric |");
    for r in results {
        out += &format!(" {} |", r.name);
    }
    out += "\n|---|";
    out += &"---:|".repeat(results.len());
    out.push('\n');
    for (label, vals) in cells(results) {
        out += &format!("| {label} | {} |\n", vals.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_rows(rng: &mut StdRng, n: usize, dim: usize, shift: f32) -> Vec<f32> {
        (0..n * dim).map(|i| rng.gen_range(-1.0f32..1.0) + if i % dim == 0 { shift } else { 0.0 }).collect()
    }

    #[test]
    fn writes_tables_and_four_plots_with_one_series_per_column() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let dim = 8;
        let columns: Vec<Column> = [("cone", 6.0f32), ("spread", 0.0)]
            .iter()
            .map(|(name, shift)| Column {
                name: name.to_string(),
                dim,
                sentences: gaussian_rows(&mut rng, 300, dim, *shift),
                pairs: Some((gaussian_rows(&mut rng, 50, dim, *shift), gaussian_rows(&mut rng, 50, dim, *shift))),
            })
            .collect();
        let (results, files) = compare(&columns, dir.path(), 1).unwrap();
        assert!(results[0].metrics.mean_cosine > 0.5 && results[1].metrics.mean_cosine.abs() < 0.05);
        assert_eq!(files.len(), 8, "4 plots x (svg, png): {files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() > 1000, "{}", f.display());
        }
        for stem in ["cosine", "alignment", "spectrum"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            for name in ["cone", "spread"] {
                assert_eq!(svg.matches(&format!(">\n{name}\n</text>")).count(), 1, "{stem}: legend entry {name}");
            }
        }
        let md = std::fs::read_to_string(dir.path().join("compare.md")).unwrap();
        assert!(md.contains("| metric | cone | spread |") && md.contains("uniformity"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("compare.json")).unwrap()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 2);
    }
}
