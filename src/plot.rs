//! Comparison plots for a run report: histograms of similarities or distances, Wang & Isola's
//! circle picture of the embedding distribution, and eigenvalue spectra.
//!
//! Each plot is drawn once with `plotters` into two files, `<stem>.svg` (for reports and diffs) and
//! `<stem>.png` (for quick viewing), both written atomically. Text needs a TrueType font at run
//! time: we ship none, so the first system font found is used (`HYPERSPHERE_FONT` names one
//! explicitly; on Debian `fonts-dejavu-core` provides DejaVu Sans). Without any font, plotting
//! fails with an error that says so rather than producing unlabelled pictures.

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// One named data set; the name becomes its legend entry.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
}

const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
/// Most points drawn per circle panel (the density still uses all of them), to keep SVGs small.
const MAX_DRAWN_POINTS: usize = 1000;
/// Angles at which circle-panel densities are evaluated.
const ANGLE_STEPS: usize = 360;

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Histogram curves (one line per series, shared bins over [lo, hi], density-normalised), e.g.
/// cosine similarity of random sentence pairs in [-1, 1] or positive-pair distances in [0, 2].
/// Writes `<stem>.svg` and `<stem>.png` and returns both paths.
pub fn histogram(
    path_stem: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
    lo: f64,
    hi: f64,
    bins: usize,
) -> Result<Vec<PathBuf>> {
    if !(lo.is_finite() && hi.is_finite() && lo < hi) || bins == 0 {
        return Err(Error::Invalid(format!(
            "histogram {}: need finite lo < hi and bins > 0, got [{lo}, {hi}] with {bins} bins",
            path_stem.display()
        )));
    }
    check_nonempty(path_stem, series.len())?;
    let dens: Vec<Vec<f64>> = series.iter().map(|s| histogram_density(s.values, lo, hi, bins)).collect();
    let fig = Fig::Hist { title, x_label, series, dens: &dens, lo, hi };
    render(path_stem, (900, 540), &fig)
}

/// Wang & Isola's circle picture. For each panel the 2-D points (e.g. the top-2 principal
/// components, any scale) are normalised onto the unit circle; the top row shows the points with
/// the von Mises kernel density of their angles drawn radially (radius 1 + scaled density), the
/// bottom row the same density against the angle, on one y scale shared by all panels. Points at
/// the origin or with non-finite coordinates have no direction and are skipped.
pub fn circle_panels(
    path_stem: &Path,
    title: &str,
    panels: &[(&str, &[[f64; 2]])],
    kappa: f64,
) -> Result<Vec<PathBuf>> {
    if !(kappa.is_finite() && kappa >= 0.0) {
        return Err(Error::Invalid(format!(
            "circle plot {}: kappa must be finite and >= 0, got {kappa}",
            path_stem.display()
        )));
    }
    check_nonempty(path_stem, panels.len())?;
    let grid: Vec<f64> = (0..=ANGLE_STEPS).map(|i| -PI + 2.0 * PI * i as f64 / ANGLE_STEPS as f64).collect();
    let data: Vec<CirclePanel> = panels
        .iter()
        .map(|(name, pts)| {
            let angles: Vec<f64> = pts
                .iter()
                .filter(|p| p[0].is_finite() && p[1].is_finite() && (p[0] != 0.0 || p[1] != 0.0))
                .map(|p| p[1].atan2(p[0]))
                .collect();
            let n = angles.len().max(1) as f64;
            let (c, s) = angles.iter().fold((0.0, 0.0), |(c, s), a| (c + a.cos(), s + a.sin()));
            CirclePanel {
                name,
                density: von_mises_kde(&angles, kappa, &grid),
                resultant: (c * c + s * s).sqrt() / n,
                angles,
            }
        })
        .collect();
    let width = 340 * panels.len() as u32;
    render(path_stem, (width.max(500), 660), &Fig::Circles { title, panels: &data, grid: &grid, kappa })
}

/// Eigenvalue spectra: each series is sorted descending and normalised to sum 1 and drawn against
/// its rank on a log y axis. Non-positive and non-finite values (numerical noise) are left out.
pub fn spectrum(path_stem: &Path, title: &str, series: &[Series]) -> Result<Vec<PathBuf>> {
    check_nonempty(path_stem, series.len())?;
    let norm: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s.values.iter().copied().filter(|x| x.is_finite() && *x > 0.0).collect();
            v.sort_by(|a, b| b.total_cmp(a));
            let sum: f64 = v.iter().sum();
            v.iter().map(|x| x / sum).collect()
        })
        .collect();
    render(path_stem, (900, 540), &Fig::Spectrum { title, series, norm: &norm })
}

/// Von Mises kernel density estimate: the density at each angle in `at` of the samples `angles`
/// (radians), `(1/n) sum_i exp(kappa cos(t - a_i)) / (2 pi I0(kappa))`, which integrates to 1 over
/// any interval of length 2 pi. Computed in the scaled form `exp(kappa (cos - 1)) / I0e(kappa)` so
/// large kappa cannot overflow. Negative kappa is treated as 0 (the uniform density); no samples
/// give all zeros.
pub fn von_mises_kde(angles: &[f64], kappa: f64, at: &[f64]) -> Vec<f64> {
    let kappa = kappa.max(0.0);
    if angles.is_empty() {
        return vec![0.0; at.len()];
    }
    let norm = 1.0 / (2.0 * PI * bessel_i0e(kappa) * angles.len() as f64);
    at.iter().map(|t| angles.iter().map(|a| (kappa * ((t - a).cos() - 1.0)).exp()).sum::<f64>() * norm).collect()
}

/// Density-normalised histogram over `bins` equal bins of [lo, hi] (`hi` itself falls in the last
/// bin). Values outside the range by more than a rounding margin (1e-6 of its width) and NaN are
/// dropped; the rest are normalised so the histogram integrates to 1 (all zeros if none is left).
pub fn histogram_density(values: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    let valid = lo.is_finite() && hi.is_finite() && lo < hi;
    if bins == 0 || !valid {
        return vec![0.0; bins];
    }
    let mut counts = vec![0usize; bins];
    let width = (hi - lo) / bins as f64;
    let tol = 1e-6 * (hi - lo);
    let mut total = 0usize;
    for &v in values {
        if v >= lo - tol && v <= hi + tol {
            let i = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
            counts[i] += 1;
            total += 1;
        }
    }
    let scale = if total == 0 { 0.0 } else { 1.0 / (total as f64 * width) };
    counts.iter().map(|&c| c as f64 * scale).collect()
}

/// exp(-|x|) I0(x), Abramowitz & Stegun 9.8.1-2 (relative error below 2e-7).
fn bessel_i0e(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 3.75 {
        let y = (x / 3.75).powi(2);
        let p = 1.0
            + y * (3.5156229 + y * (3.0899424 + y * (1.2067492 + y * (0.2659732 + y * (0.0360768 + y * 0.0045813)))));
        p * (-ax).exp()
    } else {
        let y = 3.75 / ax;
        let p = 0.39894228
            + y * (0.01328592
                + y * (0.00225319
                    + y * (-0.00157565
                        + y * (0.00916281
                            + y * (-0.02057706 + y * (0.02635537 + y * (-0.01647633 + y * 0.00392377)))))));
        p / ax.sqrt()
    }
}

struct CirclePanel<'a> {
    name: &'a str,
    angles: Vec<f64>,
    density: Vec<f64>,
    resultant: f64,
}

enum Fig<'a> {
    Hist { title: &'a str, x_label: &'a str, series: &'a [Series<'a>], dens: &'a [Vec<f64>], lo: f64, hi: f64 },
    Circles { title: &'a str, panels: &'a [CirclePanel<'a>], grid: &'a [f64], kappa: f64 },
    Spectrum { title: &'a str, series: &'a [Series<'a>], norm: &'a [Vec<f64>] },
}

fn check_nonempty(stem: &Path, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid(format!("plot {}: nothing to draw", stem.display())));
    }
    Ok(())
}

/// Draws `fig` once as SVG and once as PNG and writes both atomically.
fn render(stem: &Path, (w, h): (u32, u32), fig: &Fig) -> Result<Vec<PathBuf>> {
    let [svg_path, png_path] = [".svg", ".png"].map(|ext| {
        let mut s = stem.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    });
    ensure_font().map_err(ctx(&svg_path))?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw(&root, fig).and_then(|_| root.present().map_err(err)).map_err(ctx(&svg_path))?;
    }
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, fig).and_then(|_| root.present().map_err(err)).map_err(ctx(&png_path))?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .and_then(|mut wr| wr.write_image_data(&rgb))
            .map_err(|e| Error::data(&png_path, format!("cannot encode: {e}")))?;
    }
    write_atomic(&svg_path, svg.as_bytes())?;
    write_atomic(&png_path, &png_bytes)?;
    Ok(vec![svg_path, png_path])
}

fn ctx(p: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| Error::data(p, format!("cannot draw: {e}"))
}

fn err<E: std::fmt::Display>(e: E) -> Error {
    Error::Invalid(e.to_string())
}

/// Writes to a temporary name in the same folder, then renames, so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::data(path, format!("cannot create its folder: {e}")))?;
    crate::io::write_atomic(path, bytes)
}

/// Registers a system TrueType font once per process for all plot text.
fn ensure_font() -> Result<()> {
    static FOUND: OnceLock<bool> = OnceLock::new();
    match FOUND.get_or_init(register_system_font) {
        true => Ok(()),
        false => Err(Error::invalid(
            "no TrueType font found for plot text (install fonts-dejavu-core or set HYPERSPHERE_FONT to a .ttf file)",
        )),
    }
}

const FONT_PATHS: [&str; 11] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Tries `HYPERSPHERE_FONT`, then well-known paths, then any regular font under the usual
/// folders; whether one was registered.
fn register_system_font() -> bool {
    let register = |path: &PathBuf| {
        // plotters keeps fonts for the whole process, hence the leak (once per process).
        std::fs::read(path).is_ok_and(|bytes| {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
        })
    };
    let env = std::env::var_os("HYPERSPHERE_FONT").map(PathBuf::from);
    if env.iter().chain(&FONT_PATHS.map(PathBuf::from)).any(register) {
        return true;
    }
    let mut found = Vec::new();
    for root in ["/usr/share/fonts", "/usr/local/share/fonts"] {
        find_fonts(Path::new(root), 4, &mut found);
    }
    found.iter().any(register)
}

fn find_fonts(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if p.is_dir() && depth > 0 {
            find_fonts(&p, depth - 1, out);
        } else if (name.ends_with(".ttf") || name.ends_with(".otf"))
            && !["bold", "italic", "oblique", "mono", "light", "condensed"].iter().any(|w| name.contains(w))
        {
            out.push(p);
        }
    }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Fig) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    match *fig {
        Fig::Hist { title, x_label, series, dens, lo, hi } => {
            let ymax = dens.iter().flatten().fold(0.0f64, |m, &d| m.max(d));
            let ymax = if ymax > 0.0 { ymax * 1.08 } else { 1.0 };
            let mut chart = cartesian(root, title).build_cartesian_2d(lo..hi, 0.0..ymax).map_err(err)?;
            mesh(&mut chart, x_label, "density")?;
            for (i, (s, d)) in series.iter().zip(dens).enumerate() {
                let width = (hi - lo) / d.len() as f64;
                let mut pts = vec![(lo, 0.0)];
                for (j, &y) in d.iter().enumerate() {
                    pts.push((lo + j as f64 * width, y));
                    pts.push((lo + (j + 1) as f64 * width, y));
                }
                pts.push((hi, 0.0));
                line(&mut chart, pts, s.name, i)?;
            }
            // Legend on the side where the curves are lower.
            let side_max = |r: std::ops::Range<f64>| {
                dens.iter()
                    .flat_map(|d| d.iter().enumerate().filter(|(j, _)| r.contains(&(*j as f64 / d.len() as f64))))
                    .fold(0.0f64, |m, (_, &y)| m.max(y))
            };
            let pos = if side_max(0.0..0.4) <= side_max(0.6..1.0) {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::UpperRight
            };
            legend(&mut chart, pos)
        }
        Fig::Spectrum { title, series, norm } => {
            let n = norm.iter().map(Vec::len).max().unwrap_or(0).max(2);
            let min = norm.iter().flatten().fold(1.0f64, |m, &v| m.min(v));
            let floor = 10f64.powf(min.max(1e-12).log10().floor()).min(0.1);
            let mut chart =
                cartesian(root, title).build_cartesian_2d(1.0..n as f64, (floor..1.0).log_scale()).map_err(err)?;
            mesh(&mut chart, "rank", "share of total variance")?;
            for (i, (s, v)) in series.iter().zip(norm).enumerate() {
                let pts = v.iter().enumerate().map(|(j, &y)| ((j + 1) as f64, y)).collect();
                line(&mut chart, pts, s.name, i)?;
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight)
        }
        Fig::Circles { title, panels, grid, kappa } => {
            let area = root.margin(10, 0, 0, 0).titled(title, (FONT, 24)).map_err(err)?;
            let (_, h) = area.dim_in_pixel();
            let dmax = panels.iter().flat_map(|p| p.density.iter()).fold(0.0f64, |m, &d| m.max(d));
            let dmax = if dmax > 0.0 { dmax } else { 1.0 / (2.0 * PI) };
            for (i, (p, cell)) in panels.iter().zip(area.split_evenly((1, panels.len()))).enumerate() {
                let (top, bottom) = cell.split_vertically(h.saturating_sub(230));
                circle_panel(&top, p, grid, dmax, color(i))?;
                angle_panel(&bottom, p, grid, dmax, kappa, color(i), i == 0)?;
            }
            Ok(())
        }
    }
}

type Chart<'a, DB, X, Y> = ChartContext<'a, DB, Cartesian2d<X, Y>>;

fn cartesian<'a, 'b, DB: DrawingBackend>(root: &'a DrawingArea<DB, Shift>, title: &str) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, (FONT, 24)).margin(14).x_label_area_size(48).y_label_area_size(80);
    b
}

fn mesh<'a, DB, X, Y>(chart: &mut Chart<'a, DB, X, Y>, x: &str, y: &str) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let fmt = |v: &f64| {
        if *v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
            format!("{v:.0e}")
        } else {
            format!("{}", (v * 1e4).round() / 1e4)
        }
    };
    chart
        .configure_mesh()
        .x_desc(x)
        .y_desc(y)
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .bold_line_style(BLACK.mix(0.15))
        .light_line_style(BLACK.mix(0.05))
        .max_light_lines(2)
        .draw()
        .map_err(err)
}

fn line<'a, DB, X, Y>(chart: &mut Chart<'a, DB, X, Y>, pts: Vec<(f64, f64)>, name: &str, i: usize) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let style = color(i).stroke_width(2);
    chart
        .draw_series(std::iter::once(PathElement::new(pts, style)))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    Ok(())
}

fn legend<'a, DB, X, Y>(chart: &mut Chart<'a, DB, X, Y>, pos: SeriesLabelPosition) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(pos)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .margin(12)
        .draw()
        .map_err(err)
}

/// Points on the unit circle plus the density drawn radially: radius 1 + 0.6 density / dmax.
fn circle_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &CirclePanel,
    grid: &[f64],
    dmax: f64,
    c: RGBColor,
) -> Result<()> {
    let area = area.titled(p.name, (FONT, 18)).map_err(err)?;
    let (w, h) = area.dim_in_pixel();
    let s = w.min(h).saturating_sub(8);
    let (dx, dy) = ((w - s) / 2, (h - s) / 2);
    let sq = area.margin(dy, h - s - dy, dx, w - s - dx);
    let mut chart = ChartBuilder::on(&sq).build_cartesian_2d(-1.65..1.65, -1.65..1.65).map_err(err)?;
    let ring = |r: &dyn Fn(usize) -> f64| -> Vec<(f64, f64)> {
        grid.iter().enumerate().map(|(j, t)| (r(j) * t.cos(), r(j) * t.sin())).collect()
    };
    let curve = ring(&|j| 1.0 + 0.6 * p.density[j] / dmax);
    let band: Vec<_> = curve.iter().copied().chain(ring(&|_| 1.0).into_iter().rev()).collect();
    chart.draw_series([Polygon::new(band, c.mix(0.15))]).map_err(err)?;
    chart.draw_series([PathElement::new(ring(&|_| 1.0), BLACK.mix(0.4))]).map_err(err)?;
    let stride = p.angles.len().div_ceil(MAX_DRAWN_POINTS).max(1);
    let dot = c.mix(0.25).filled();
    chart.draw_series(p.angles.iter().step_by(stride).map(|a| Circle::new((a.cos(), a.sin()), 2, dot))).map_err(err)?;
    chart.draw_series([PathElement::new(curve, c.stroke_width(2))]).map_err(err)?;
    let info = if p.angles.is_empty() {
        "no points".to_string()
    } else {
        format!("n = {}, mean resultant length {:.2}", p.angles.len(), p.resultant)
    };
    let style = (FONT, 13).into_font().color(&BLACK.mix(0.7)).pos(Pos::new(HPos::Center, VPos::Bottom));
    sq.draw(&Text::new(info, (s as i32 / 2, s as i32), style)).map_err(err)
}

/// The same density against the angle, on the y scale shared by all panels.
fn angle_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &CirclePanel,
    grid: &[f64],
    dmax: f64,
    kappa: f64,
    c: RGBColor,
    first: bool,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(44)
        .y_label_area_size(if first { 62 } else { 40 })
        .build_cartesian_2d(-1.0..1.0, 0.0..dmax * 1.08)
        .map_err(err)?;
    let xfmt = |v: &f64| match (v * 1e6).round() as i64 {
        -1_000_000 => "-π".into(),
        -500_000 => "-π/2".into(),
        0 => "0".into(),
        500_000 => "π/2".into(),
        1_000_000 => "π".into(),
        _ => format!("{}π", (v * 100.0).round() / 100.0),
    };
    let yfmt = |v: &f64| format!("{}", (v * 100.0).round() / 100.0);
    chart
        .configure_mesh()
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .x_desc(format!("angle (vMF KDE, κ = {kappa})"))
        .y_desc(if first { "density" } else { "" })
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .bold_line_style(BLACK.mix(0.15))
        .max_light_lines(1)
        .draw()
        .map_err(err)?;
    let pts = grid.iter().zip(&p.density).map(|(&t, &d)| (t / PI, d));
    chart.draw_series(AreaSeries::new(pts, 0.0, c.mix(0.2)).border_style(c.stroke_width(2))).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn grid(m: usize) -> Vec<f64> {
        (0..m).map(|i| -PI + 2.0 * PI * i as f64 / m as f64).collect()
    }

    /// Checks both files exist and are non-empty, the PNG is a PNG, and returns the SVG text.
    fn read_outputs(paths: &[PathBuf], stem: &Path) -> String {
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0], stem.with_file_name(format!("{}.svg", stem.file_name().unwrap().to_str().unwrap())));
        assert!(paths[1].to_str().unwrap().ends_with(".png"));
        let png = std::fs::read(&paths[1]).unwrap();
        assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let svg = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        svg
    }

    /// Number of text elements that read exactly `label` (plotters puts the text on its own line).
    fn labels(svg: &str, label: &str) -> usize {
        svg.matches(&format!(">\n{label}\n</text>")).count()
    }

    #[test]
    fn kde_integrates_to_one_and_peaks_at_mode() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let concentrated: Vec<f64> = (0..500).map(|_| 1.0 + 0.2 * (rng.gen::<f64>() - 0.5)).collect();
        let spread: Vec<f64> = (0..500).map(|_| (rng.gen::<f64>() - 0.5) * 2.0 * PI).collect();
        let g = grid(4000);
        for kappa in [0.0, 1.0, 10.0, 200.0, 5000.0] {
            for sample in [&concentrated, &spread] {
                let d = von_mises_kde(sample, kappa, &g);
                let integral: f64 = d.iter().sum::<f64>() * 2.0 * PI / g.len() as f64;
                assert!((integral - 1.0).abs() < 1e-5, "kappa {kappa}: integral {integral}");
                assert!(d.iter().all(|v| v.is_finite() && *v >= 0.0));
            }
        }
        let d = von_mises_kde(&concentrated, 50.0, &g);
        let (imax, _) = d.iter().enumerate().fold((0, 0.0), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        assert!((g[imax] - 1.0).abs() < 0.05, "peak at {}", g[imax]);
        // Periodic: samples at pi show up at -pi too.
        let wrap = von_mises_kde(&[PI - 0.01], 10.0, &[-PI + 0.01, PI - 0.01]);
        assert!((wrap[0] - wrap[1]).abs() < 0.02 * wrap[1]);
        assert_eq!(von_mises_kde(&[], 10.0, &[0.0, 1.0]), vec![0.0, 0.0]);
        // kappa = 0 is the uniform density.
        assert!((von_mises_kde(&[0.3], 0.0, &[2.0])[0] - 1.0 / (2.0 * PI)).abs() < 1e-6);
    }

    #[test]
    fn histogram_density_integrates_to_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let v: Vec<f64> = (0..1000).map(|_| rng.gen::<f64>() * 2.0 - 1.0).chain([1.0, -1.0, 1.0 + 1e-9]).collect();
        let d = histogram_density(&v, -1.0, 1.0, 37);
        assert_eq!(d.len(), 37);
        assert!((d.iter().sum::<f64>() * 2.0 / 37.0 - 1.0).abs() < 1e-12);
        // Out-of-range and NaN values are dropped; the rest still integrates to 1.
        let d = histogram_density(&[0.1, 0.2, 5.0, f64::NAN, -3.0], 0.0, 1.0, 4);
        assert_eq!(d, vec![4.0, 0.0, 0.0, 0.0]); // 2 values in a bin of width 0.25
        assert_eq!(histogram_density(&[], 0.0, 1.0, 3), vec![0.0; 3]);
    }

    #[test]
    fn histogram_writes_svg_and_png_with_a_legend_entry_per_series() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("sub").join("cos.epoch1");
        let a: Vec<f64> = (0..500).map(|i| 0.9 + 0.1 * (i as f64 / 500.0)).collect();
        let b: Vec<f64> = (0..500).map(|i| -0.5 + i as f64 / 500.0).collect();
        let series = [
            Series { name: "pretrained", values: &a },
            Series { name: "fine-tuned", values: &b },
            Series { name: "empty", values: &[] },
        ];
        let paths = histogram(&stem, "Cosine similarity", "cosine", &series, -1.0, 1.0, 50).unwrap();
        let svg = read_outputs(&paths, &stem);
        for s in &series {
            assert_eq!(labels(&svg, s.name), 1, "{}", s.name);
        }
        assert_eq!(labels(&svg, "Cosine similarity"), 1);
        assert_eq!(labels(&svg, "cosine"), 1);
        // One stroked polyline per series plus one legend sample each.
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2 * series.len());
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(stem.parent().unwrap()).unwrap().count(), 2);
    }

    #[test]
    fn circle_panels_and_spectrum_write_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let cone: Vec<[f64; 2]> = (0..300).map(|_| [5.0 + rng.gen::<f64>(), 1.0 + rng.gen::<f64>()]).collect();
        let spread: Vec<[f64; 2]> = (0..300).map(|_| [rng.gen::<f64>() - 0.5, rng.gen::<f64>() - 0.5]).collect();
        let stem = dir.path().join("circle");
        let panels: [(&str, &[[f64; 2]]); 3] =
            [("pretrained", &cone), ("fine-tuned", &spread), ("degenerate", &[[0.0, 0.0]])];
        let svg = read_outputs(&circle_panels(&stem, "On the circle", &panels, 10.0).unwrap(), &stem);
        for (name, _) in panels {
            assert_eq!(labels(&svg, name), 1, "{name}");
        }
        assert_eq!(labels(&svg, "no points"), 1);

        let stem = dir.path().join("spectrum");
        let ev1: Vec<f64> = (0..64).map(|i| (-(i as f64) / 4.0).exp()).collect();
        let ev2: Vec<f64> = (0..64).map(|i| 1.0 / (1.0 + i as f64)).chain([0.0, -1e-9, f64::NAN]).collect();
        let series = [Series { name: "pretrained", values: &ev1 }, Series { name: "fine-tuned", values: &ev2 }];
        let svg = read_outputs(&spectrum(&stem, "Spectrum", &series).unwrap(), &stem);
        for s in &series {
            assert_eq!(labels(&svg, s.name), 1, "{}", s.name);
        }
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2 * series.len());
        // Degenerate spectra (one value, nothing positive) still draw.
        let series = [Series { name: "one", values: &[3.0] }, Series { name: "none", values: &[0.0] }];
        read_outputs(&spectrum(&stem, "Spectrum", &series).unwrap(), &stem);
    }

    #[test]
    fn invalid_arguments_are_errors_naming_the_file() {
        let stem = Path::new("/nonexistent/x/plot");
        let s = [Series { name: "a", values: &[0.5] }];
        assert!(histogram(stem, "t", "x", &s, 1.0, 1.0, 10).unwrap_err().to_string().contains("/nonexistent/x/plot"));
        assert!(histogram(stem, "t", "x", &s, 0.0, 1.0, 0).is_err());
        assert!(histogram(stem, "t", "x", &[], 0.0, 1.0, 10).is_err());
        assert!(circle_panels(stem, "t", &[("a", &[[1.0, 0.0]])], f64::NAN).is_err());
        assert!(spectrum(stem, "t", &[]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = histogram(&file.join("plot"), "t", "x", &s, 0.0, 1.0, 10).unwrap_err().to_string();
        assert!(e.contains("cannot") && e.contains("plot.svg"), "{e}");
    }
}
