//! The contact sheet: every frame of a storyboard on one PNG, in a grid, each captioned with its
//! number and prompt (and the style reference first), so a person sees the story at a glance.

use font8x8::UnicodeFonts;
use image::imageops::FilterType;
use image::{Rgb, RgbImage};

const BACKGROUND: Rgb<u8> = Rgb([30, 30, 34]);
const TEXT: Rgb<u8> = Rgb([230, 230, 230]);
const DIM: Rgb<u8> = Rgb([150, 150, 160]);
const FAILED: Rgb<u8> = Rgb([110, 35, 35]);
const MARGIN: u32 = 12;
const CAPTION_LINES: usize = 3;

/// One cell of the sheet.
#[derive(Clone)]
pub struct Cell {
    /// Big label (`#3`, `style`).
    pub label: String,
    /// Wrapped under the label.
    pub caption: String,
    /// `None`: the frame failed or is missing; the cell says so.
    pub image: Option<RgbImage>,
}

/// Frames per contact sheet: a storyboard of up to 10,000 frames becomes pages a person can open
/// (6 x 8 cells), not one picture of gigabytes.
pub const FRAMES_PER_SHEET: usize = 48;

/// The sheet files of `frames` frames: `contact-sheet.png`, or `contact-sheet-01.png`, ... when
/// they fill several pages.
pub fn sheet_names(frames: usize) -> Vec<String> {
    let pages = frames.div_ceil(FRAMES_PER_SHEET).max(1);
    if pages == 1 {
        return vec!["contact-sheet.png".into()];
    }
    let digits = pages.to_string().len().max(2);
    (1..=pages)
        .map(|p| format!("contact-sheet-{p:0digits$}.png"))
        .collect()
}

/// A picture at the size the sheet shows it, so a sheet's cells are held as thumbnails only.
pub fn thumbnail(img: &RgbImage) -> RgbImage {
    let (tw, th) = thumb_size(img.width(), img.height());
    let filter = if img.width() < tw {
        FilterType::Nearest
    } else {
        FilterType::Triangle
    };
    image::imageops::resize(img, tw, th, filter)
}

/// Thumbnail width: frames shrink to at most 256 px, and tiny ones grow to 128 px (nearest
/// neighbour, so pixels stay visible) so their captions fit.
fn thumb_size(width: u32, height: u32) -> (u32, u32) {
    let target = width.clamp(128, 256);
    let h = ((height as u64 * target as u64) / width.max(1) as u64).max(1) as u32;
    (target, h)
}

fn draw_char(img: &mut RgbImage, x: u32, y: u32, c: char, scale: u32, color: Rgb<u8>) {
    let glyph = font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8]);
    for (row, bits) in glyph.iter().enumerate() {
        for col in 0..8u32 {
            if bits & (1 << col) == 0 {
                continue;
            }
            for dy in 0..scale {
                for dx in 0..scale {
                    let (px, py) = (x + col * scale + dx, y + row as u32 * scale + dy);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, color);
                    }
                }
            }
        }
    }
}

fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        draw_char(img, x + i as u32 * 8 * scale, y, c, scale, color);
    }
}

/// Greedy word wrap into at most `lines` lines of `width` characters; the last line ends in
/// `...` when text is left over.
fn wrap(text: &str, width: usize, lines: usize) -> Vec<String> {
    let width = width.max(4);
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut words = text.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let word: String = word.chars().take(width).collect();
        let needed = if current.is_empty() {
            word.len()
        } else {
            current.len() + 1 + word.len()
        };
        if needed <= width {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(&word);
            continue;
        }
        out.push(std::mem::take(&mut current));
        current = word;
        if out.len() == lines {
            break;
        }
        if words.peek().is_none() {
            break;
        }
    }
    let truncated = out.len() == lines;
    if !truncated && !current.is_empty() {
        out.push(current);
    }
    if truncated {
        if let Some(last) = out.last_mut() {
            let keep = width.saturating_sub(3).min(last.chars().count());
            *last = format!("{}...", last.chars().take(keep).collect::<String>());
        }
    }
    out
}

/// Lays the cells out in a grid under `title`.
pub fn contact_sheet(title: &str, cells: &[Cell]) -> RgbImage {
    let (frame_w, frame_h) = cells
        .iter()
        .find_map(|c| c.image.as_ref().map(|i| (i.width(), i.height())))
        .unwrap_or((256, 256));
    let (tw, th) = thumb_size(frame_w, frame_h);
    let columns = match cells.len() {
        0..=4 => cells.len().max(1),
        5..=9 => 3,
        10..=16 => 4,
        _ => 6,
    } as u32;
    let rows = (cells.len() as u32).div_ceil(columns).max(1);
    let label_h = 16;
    let caption_h = CAPTION_LINES as u32 * 10;
    let cell_h = th + 6 + label_h + 4 + caption_h;
    let title_h = 16 + MARGIN;
    let width = MARGIN + columns * (tw + MARGIN);
    let height = MARGIN + title_h + rows * (cell_h + MARGIN);
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    // Big title when it fits, else small, else cut.
    let room = (width - 2 * MARGIN) as usize;
    let scale = if title.chars().count() * 16 <= room {
        2
    } else {
        1
    };
    let title: String = title.chars().take(room / (8 * scale as usize)).collect();
    draw_text(
        &mut sheet,
        MARGIN,
        MARGIN + (2 - scale) * 4,
        &title,
        scale,
        TEXT,
    );

    for (i, cell) in cells.iter().enumerate() {
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let x = MARGIN + col * (tw + MARGIN);
        let y = MARGIN + title_h + row * (cell_h + MARGIN);
        match &cell.image {
            Some(img) if (img.width(), img.height()) == (tw, th) => {
                image::imageops::replace(&mut sheet, img, x as i64, y as i64);
            }
            Some(img) => {
                let filter = if img.width() < tw {
                    FilterType::Nearest
                } else {
                    FilterType::Triangle
                };
                let thumb = image::imageops::resize(img, tw, th, filter);
                image::imageops::replace(&mut sheet, &thumb, x as i64, y as i64);
            }
            None => {
                let block = RgbImage::from_pixel(tw, th, FAILED);
                image::imageops::replace(&mut sheet, &block, x as i64, y as i64);
                draw_text(&mut sheet, x + 8, y + th / 2 - 4, "not rendered", 1, TEXT);
            }
        }
        let ly = y + th + 6;
        // Labels stay in their cell: big when they fit, else small, else cut.
        let label_scale = if cell.label.chars().count() * 16 <= tw as usize {
            2
        } else {
            1
        };
        let label: String = cell
            .label
            .chars()
            .take(tw as usize / (8 * label_scale as usize))
            .collect();
        draw_text(
            &mut sheet,
            x,
            ly + (2 - label_scale) * 4,
            &label,
            label_scale,
            TEXT,
        );
        let per_line = (tw / 8) as usize;
        for (n, line) in wrap(&cell.caption, per_line, CAPTION_LINES)
            .iter()
            .enumerate()
        {
            draw_text(
                &mut sheet,
                x,
                ly + label_h + 4 + n as u32 * 10,
                line,
                1,
                DIM,
            );
        }
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_on_words_and_marks_what_is_cut() {
        assert_eq!(
            wrap("a lighthouse on a cliff", 12, 3),
            vec!["a lighthouse", "on a cliff"]
        );
        let long = wrap("one two three four five six seven eight nine ten", 9, 2);
        assert_eq!(long.len(), 2);
        assert!(long[1].ends_with("..."), "{long:?}");
        assert!(long.iter().all(|l| l.len() <= 9), "{long:?}");
        assert_eq!(wrap("", 10, 3), Vec::<String>::new());
    }

    #[test]
    fn large_storyboards_get_numbered_pages() {
        assert_eq!(sheet_names(1), vec!["contact-sheet.png"]);
        assert_eq!(sheet_names(FRAMES_PER_SHEET), vec!["contact-sheet.png"]);
        assert_eq!(
            sheet_names(FRAMES_PER_SHEET + 1),
            vec!["contact-sheet-01.png", "contact-sheet-02.png"]
        );
        let many = sheet_names(10_000);
        assert_eq!(many.len(), 209);
        assert_eq!(
            (many[0].as_str(), many[208].as_str()),
            ("contact-sheet-001.png", "contact-sheet-209.png")
        );
        // A thumbnail is what the sheet draws, at the sheet's cell size.
        let t = thumbnail(&RgbImage::new(512, 256));
        assert_eq!((t.width(), t.height()), (256, 128));
    }

    #[test]
    fn sheet_holds_every_cell_with_its_pixels_and_labels() {
        let red = RgbImage::from_pixel(64, 64, Rgb([200, 0, 0]));
        let blue = RgbImage::from_pixel(64, 64, Rgb([0, 0, 200]));
        let cells = vec![
            Cell {
                label: "style".into(),
                caption: "reference".into(),
                image: Some(red),
            },
            Cell {
                label: "#1".into(),
                caption: "a fox".into(),
                image: Some(blue),
            },
            Cell {
                label: "#2".into(),
                caption: "failed".into(),
                image: None,
            },
        ];
        let sheet = contact_sheet("tiny board", &cells);
        // Three columns of 128 px thumbnails (64 px frames grow to 128).
        assert_eq!(sheet.width(), MARGIN + 3 * (128 + MARGIN));
        let y = MARGIN + 16 + MARGIN + 64;
        assert_eq!(*sheet.get_pixel(MARGIN + 64, y), Rgb([200, 0, 0]));
        assert_eq!(*sheet.get_pixel(2 * MARGIN + 128 + 64, y), Rgb([0, 0, 200]));
        assert_eq!(*sheet.get_pixel(3 * MARGIN + 256 + 2, y - 60), FAILED);
        // Text was drawn under the thumbnails.
        let label_row = y - 64 + 128 + 6;
        let lit = (MARGIN..MARGIN + 128)
            .flat_map(|x| (label_row..label_row + 16).map(move |y| (x, y)))
            .filter(|&(x, y)| *sheet.get_pixel(x, y) == TEXT)
            .count();
        assert!(lit > 20, "label pixels: {lit}");
    }
}
