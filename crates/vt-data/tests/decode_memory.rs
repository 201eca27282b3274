//! The memory decoding takes, counted by an allocator that sums each thread's allocations:
//! what an image's header does not declare (a PNG's colour profile) cannot make a small
//! image cost what the largest allowed one would.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use vt_data::decode::{decode_rgb_limited, DEFAULT_MAX_PIXELS};

/// Counts the bytes this thread holds (what it allocated less what it freed) and their
/// peak, around the system allocator.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // Not during the thread's teardown, when its locals are gone.
    let _ = HELD.try_with(|held| {
        held.set(held.get() + bytes);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(held.get())));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let allocated = unsafe { System.alloc(layout) };
        if !allocated.is_null() {
            count(layout.size() as isize);
        }
        allocated
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes this thread held at once while `work` ran, beyond what it held before.
fn peak_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let before = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let result = work();
    (result, (PEAK.with(Cell::get) - before) as usize)
}

#[test]
fn a_small_png_with_a_huge_colour_profile_takes_little_memory() {
    // 8x8 pixels, and a colour profile of 200 MiB (200 KB compressed), which the limit of
    // the largest image allowed (40 M pixels of 16-bit RGBA, 320 MB) let the decoder inflate.
    let mut png = Vec::new();
    let mut encoder = PngEncoder::new(&mut png);
    encoder.set_icc_profile(vec![0; 200 << 20]).unwrap();
    encoder
        .write_image(&[0; 8 * 8 * 3], 8, 8, ExtendedColorType::Rgb8)
        .unwrap();
    assert!(png.len() < 1 << 20, "{} bytes", png.len());

    let (decoded, peak) = peak_during(|| decode_rgb_limited(&png, DEFAULT_MAX_PIXELS));
    // The pixels are decoded; the profile, which the model never reads, is not.
    assert_eq!(decoded.unwrap().dimensions(), (8, 8));
    assert!(peak < 80 << 20, "decoding took {} MiB", peak >> 20);
}
