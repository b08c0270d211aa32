//! The heat map of layer groups (rows) by served versions (columns): which groups each recent
//! update changed, coloured by the relative norm that selected them, as inline SVG.

use std::fmt::Write;

use super::Step;
use crate::model::GroupId;
use crate::plot::colour;

const CELL_W: usize = 18;
const CELL_H: usize = 12;
const LEFT: usize = 64;
const TOP: usize = 34;
/// An updated group whose norm was not measured (a static strategy, a step between traces).
const UNMEASURED: &str = "#8a8a8a";
const UNTOUCHED: &str = "#f1f1f1";

/// The heat map of the served steps among `steps`, inline SVG and its legend; row labels of
/// `selection` are bold.
pub(super) fn render(groups: &[GroupId], selection: &[GroupId], steps: &[Step]) -> String {
    let served: Vec<&Step> = steps.iter().filter(|s| s.applied()).collect();
    if served.is_empty() {
        return "<p id=\"no-heatmap\">No update served yet.</p>\n".to_string();
    }
    let (lo, hi) = range(&served);
    // Wide enough for the axis title over a handful of columns.
    let width = (LEFT + CELL_W * served.len() + 12).max(LEFT + 80);
    let height = TOP + CELL_H * groups.len() + 4;
    let mut s = format!(
        "<svg id=\"heatmap\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" \
         height=\"{height}\" font-family=\"sans-serif\" font-size=\"9\">\n\
         <text x=\"{LEFT}\" y=\"12\" font-size=\"11\">version</text>\n"
    );
    for (row, g) in groups.iter().enumerate() {
        let weight = if selection.contains(g) {
            "bold"
        } else {
            "normal"
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-weight=\"{weight}\">{g}</text>",
            LEFT - 4,
            TOP + CELL_H * row + CELL_H - 2
        );
    }
    // A label on every column would overlap; about twenty-five fit across.
    let every = served.len().div_ceil(25);
    for (col, step) in served.iter().enumerate() {
        let x = LEFT + CELL_W * col;
        if col % every == 0 || col + 1 == served.len() {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                x + CELL_W / 2,
                TOP - 4,
                step.version
            );
        }
        for (row, g) in groups.iter().enumerate() {
            s += &cell(x, TOP + CELL_H * row, *g, step, (lo, hi));
        }
    }
    s + "</svg>\n" + &legend(lo, hi)
}

/// The smallest and largest relative norm measured among `served`.
fn range(served: &[&Step]) -> (f64, f64) {
    served
        .iter()
        .flat_map(|s| s.groups.iter().filter_map(|(_, r)| *r))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(r), hi.max(r))
        })
}

fn cell(x: usize, y: usize, g: GroupId, step: &Step, (lo, hi): (f64, f64)) -> String {
    let touched = step.groups.iter().find(|(id, _)| *id == g);
    let (fill, what) = match touched {
        None => (UNTOUCHED.to_string(), "not updated".to_string()),
        Some((_, None)) => (
            UNMEASURED.to_string(),
            "updated, norm not measured".to_string(),
        ),
        Some((_, Some(r))) => {
            let [red, green, blue] = colour(*r, lo, hi);
            (
                format!("rgb({red},{green},{blue})"),
                format!("updated, relative norm {r:.3}"),
            )
        }
    };
    format!(
        "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{fill}\">\
         <title>version {}, {g}: {what}</title></rect>\n",
        CELL_W - 1,
        CELL_H - 1,
        step.version
    )
}

fn legend(lo: f64, hi: f64) -> String {
    let scale = if lo.is_finite() {
        format!("relative norm from {lo:.2} (purple) to {hi:.2} (yellow)")
    } else {
        "no relative norm measured".to_string()
    };
    format!(
        "<p class=\"legend\">Colour: {scale}; grey: updated, norm not measured; pale: not \
         updated. Bold: the groups selected now.</p>\n"
    )
}
