//! The heatmap of relative gradient norms: rows attention and MLP, columns layers.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::{GroupId, Module};
use crate::trace::GroupStat;

/// Viridis at five stops; enough for a readable ramp without a colour library.
const RAMP: [[f64; 3]; 5] = [
    [68.0, 1.0, 84.0],
    [59.0, 82.0, 139.0],
    [33.0, 145.0, 140.0],
    [94.0, 201.0, 98.0],
    [253.0, 231.0, 37.0],
];

/// The ramp's colour of `v` on the scale from `lo` to `hi` (the middle when the scale is empty).
pub(crate) fn colour(v: f64, lo: f64, hi: f64) -> [u8; 3] {
    let x = if hi > lo {
        ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.5
    } * (RAMP.len() - 1) as f64;
    let i = (x.floor() as usize).min(RAMP.len() - 2);
    let f = x - i as f64;
    let mix = |c: usize| (RAMP[i][c] * (1.0 - f) + RAMP[i + 1][c] * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

/// Writes the heatmap as SVG (with labels) or PNG (cells and colour bar), by the file's extension.
/// Cells of `selected` groups get an outline.
pub fn write_heatmap(
    path: &Path,
    groups: &[GroupStat],
    selected: &[GroupId],
    title: &str,
) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let bytes = match ext.as_str() {
        "svg" => svg(groups, selected, title).into_bytes(),
        "png" => png(groups)?,
        _ => {
            return Err(Error::Invalid(format!(
                "--plot {}: use a .svg or .png file name",
                path.display()
            )))
        }
    };
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(path, e))
}

struct Grid {
    layers: usize,
    lo: f64,
    hi: f64,
}

fn grid(groups: &[GroupStat]) -> Grid {
    let layers = groups.iter().map(|g| g.layer + 1).max().unwrap_or(0);
    let lo = groups
        .iter()
        .map(|g| g.relative)
        .fold(f64::INFINITY, f64::min);
    let hi = groups
        .iter()
        .map(|g| g.relative)
        .fold(f64::NEG_INFINITY, f64::max);
    Grid { layers, lo, hi }
}

fn row(m: Module) -> usize {
    match m {
        Module::Attn => 0,
        Module::Mlp => 1,
    }
}

fn svg(groups: &[GroupStat], selected: &[GroupId], title: &str) -> String {
    let g = grid(groups);
    let (cw, ch, left, top) = (28.0, 36.0, 56.0, 48.0);
    let width = left + cw * g.layers as f64 + 120.0;
    let height = top + ch * 2.0 + 60.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for (i, name) in ["attn", "mlp"].iter().enumerate() {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{name}</text>\n",
            left - 6.0,
            top + ch * (i as f64 + 0.5) + 4.0
        );
    }
    for st in groups {
        let [r, gr, b] = colour(st.relative, g.lo, g.hi);
        let (x, y) = (
            left + cw * st.layer as f64,
            top + ch * row(st.module) as f64,
        );
        let outline = if selected.contains(&st.id()) {
            " stroke=\"red\" stroke-width=\"2\""
        } else {
            ""
        };
        s += &format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"{cw}\" height=\"{ch}\" fill=\"rgb({r},{gr},{b})\"{outline}><title>layer {} {}: relative {:.3} (span {:.4}, full {:.4})</title></rect>\n",
            st.layer, st.module, st.relative, st.span_norm, st.full_norm
        );
    }
    for l in 0..g.layers {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{l}</text>\n",
            left + cw * (l as f64 + 0.5),
            top + ch * 2.0 + 14.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">layer (red outline: TGL-FP selection)</text>\n",
        left + cw * g.layers as f64 / 2.0,
        top + ch * 2.0 + 32.0
    );
    let bx = left + cw * g.layers as f64 + 20.0;
    for k in 0..20 {
        let v = g.lo + (g.hi - g.lo) * (19 - k) as f64 / 19.0;
        let [r, gr, b] = colour(v, g.lo, g.hi);
        s += &format!(
            "<rect x=\"{bx}\" y=\"{}\" width=\"14\" height=\"{}\" fill=\"rgb({r},{gr},{b})\"/>\n",
            top + k as f64 * ch * 2.0 / 20.0,
            ch * 2.0 / 20.0 + 0.5
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\">{:.2}</text>\n<text x=\"{}\" y=\"{}\">{:.2}</text>\n<text x=\"{}\" y=\"{}\">relative</text>\n</svg>\n",
        bx + 18.0, top + 8.0, g.hi, bx + 18.0, top + ch * 2.0, g.lo, bx, top - 8.0
    );
    s
}

/// `s` as text or an attribute value of SVG or HTML.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn png(groups: &[GroupStat]) -> Result<Vec<u8>> {
    let g = grid(groups);
    let (cw, ch, bar_gap, bar_w) = (24usize, 48usize, 12usize, 16usize);
    let w = cw * g.layers.max(1) + bar_gap + bar_w;
    let h = ch * 2;
    let mut px = vec![255u8; w * h * 3];
    let mut fill = |x0: usize, y0: usize, cw: usize, ch: usize, c: [u8; 3]| {
        for y in y0..y0 + ch {
            for x in x0..x0 + cw {
                px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
            }
        }
    };
    for st in groups {
        fill(
            st.layer * cw,
            row(st.module) * ch,
            cw - 1,
            ch - 1,
            colour(st.relative, g.lo, g.hi),
        );
    }
    for y in 0..h {
        let v = g.hi - (g.hi - g.lo) * y as f64 / (h - 1) as f64;
        fill(w - bar_w, y, bar_w, 1, colour(v, g.lo, g.hi));
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| Error::Invalid(format!("png: {e}")))?;
    writer
        .write_image_data(&px)
        .map_err(|e| Error::Invalid(format!("png: {e}")))?;
    drop(writer);
    Ok(out)
}

/// Axes of an SVG chart: data ranges mapped to the page, with title, labels and end ticks.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

const W: f64 = 640.0;
const H: f64 = 440.0;
const M: f64 = 60.0;

impl Frame {
    /// A frame around every point, padded by a tenth of each range.
    fn around(points: impl Iterator<Item = (f64, f64)> + Clone) -> Frame {
        let range = |v: Vec<f64>| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let pad = ((hi - lo) * 0.1).max(1e-3);
            (lo - pad, hi + pad)
        };
        Frame {
            x: range(points.clone().map(|p| p.0).collect()),
            y: range(points.map(|p| p.1).collect()),
        }
    }

    fn sx(&self, x: f64) -> f64 {
        M + (x - self.x.0) / (self.x.1 - self.x.0) * (W - 2.0 * M)
    }

    fn sy(&self, y: f64) -> f64 {
        H - M - (y - self.y.0) / (self.y.1 - self.y.0) * (H - 2.0 * M)
    }

    /// The SVG up to the data: background, title, axes, labels and the range ends.
    fn open(&self, x_label: &str, y_label: &str, title: &str) -> String {
        let (w, h, m) = (W, H, M);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{m}\" y=\"24\" font-size=\"14\">{}</text>\n\
             <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>\n",
            escape(title), h - m, w - m, h - m, h - m, w / 2.0, h - 20.0, escape(x_label), h / 2.0, h / 2.0, escape(y_label)
        );
        for (x, anchor) in [(self.x.0, "start"), (self.x.1, "end")] {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\">{x:.3}</text>\n",
                self.sx(x),
                h - m + 14.0
            );
        }
        for y in [self.y.0, self.y.1] {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.3}</text>\n",
                m - 4.0,
                self.sy(y) + 4.0
            );
        }
        s
    }
}

/// Writes an SVG scatter of named points, e.g. uptake against forgetting per strategy.
pub fn write_scatter(
    path: &Path,
    points: &[(String, f64, f64)],
    x_label: &str,
    y_label: &str,
    title: &str,
) -> Result<()> {
    let f = Frame::around(points.iter().map(|p| (p.1, p.2)));
    let mut s = f.open(x_label, y_label, title);
    for (name, x, y) in points {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"rgb(33,145,140)\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            f.sx(*x), f.sy(*y), f.sx(*x) + 7.0, f.sy(*y) - 7.0, escape(name)
        );
    }
    s += "</svg>\n";
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Writes an SVG chart of named lines through points, each with a legend entry.
pub fn write_lines(
    path: &Path,
    lines: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
    title: &str,
) -> Result<()> {
    const COLORS: [&str; 6] = [
        "rgb(33,145,140)",
        "rgb(68,1,84)",
        "rgb(253,231,37)",
        "rgb(59,82,139)",
        "rgb(94,201,98)",
        "rgb(200,60,60)",
    ];
    let f = Frame::around(lines.iter().flat_map(|l| l.1.iter().copied()));
    let mut s = f.open(x_label, y_label, title);
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", f.sx(x), f.sy(y)))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            path.join(" ")
        );
        for &(x, y) in points {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                f.sx(x),
                f.sy(y)
            );
        }
        let ly = M + 16.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            W - M - 150.0,
            ly - 9.0,
            W - M - 136.0,
            ly,
            escape(name)
        );
    }
    s += "</svg>\n";
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}
