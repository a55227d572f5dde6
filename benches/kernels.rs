//! Criterion benches of the `sharpness-kernels` crate, measured as memory bandwidth.
//!
//! Every kernel is memory-bound, so throughput is reported as the bytes it must move per call
//! (`Throughput::Bytes`), next to a plain copy of the same buffer (8 B an element: read 4, write
//! 4), single-threaded (`copy_from_slice`) and spread over rayon's pool in the kernels' chunks.
//! Bytes moved per f32 element:
//!
//! | kernel                          | reads | writes | total |
//! |---------------------------------|------:|-------:|------:|
//! | copy                            |     4 |      4 |     8 |
//! | sum_of_squares                  |     4 |      0 |     4 |
//! | sum_of_squares_adaptive         |     8 |      0 |     8 |
//! | perturb, perturb_adaptive       |     8 |      8 |    16 |
//! | copy (a restoration)            |     4 |      4 |     8 |
//! | restore_sgd (no momentum)       |     8 |      4 |    12 |
//! | restore_sgd (momentum)          |    12 |      8 |    20 |
//! | restore_adam                    |    16 |     12 |    28 |
//! | restore_adam (amsgrad)          |    20 |     16 |    36 |
//!
//! Two layouts: one flat buffer of 16M elements (64 MiB per argument, far beyond the caches) and
//! a list of 1,000 small tensors (16 to ~4K elements, ~2M in all), where per-tensor overhead
//! shows. `cargo bench -p sharpness-kernels` runs them (a few minutes);
//! `cargo bench -p sharpness-kernels -- --test` runs each once as a smoke test.
//! `RAYON_NUM_THREADS` sets the thread count.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rayon::prelude::*;
use sharpness_kernels::{
    copy, perturb, perturb_adaptive, restore_adam, restore_sgd, sum_of_squares,
    sum_of_squares_adaptive, AdamHyper, SgdHyper, CHUNK,
};
use std::hint::black_box;
use std::time::Duration;

const FLAT_LEN: usize = 16 * 1024 * 1024;
const LIST_TENSORS: usize = 1000;

/// Owned storage for every argument of every kernel, as aligned tensor lists.
struct Buffers {
    weights: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    backups: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
    exp_avgs: Vec<Vec<f32>>,
    exp_avg_sqs: Vec<Vec<f32>>,
    max_exp_avg_sqs: Vec<Vec<f32>>,
}

fn filled(lens: &[usize], f: impl Fn(usize) -> f32) -> Vec<Vec<f32>> {
    let mut offset = 0;
    lens.iter()
        .map(|&n| {
            let t: Vec<f32> = (offset..offset + n).map(&f).collect();
            offset += n;
            t
        })
        .collect()
}

impl Buffers {
    fn new(lens: &[usize]) -> Self {
        // Bounded values: repeated steps neither overflow nor drift into subnormals.
        Buffers {
            weights: filled(lens, |i| ((i % 1013) as f32 - 506.0) * 1e-3),
            grads: filled(lens, |i| ((i % 997) as f32 - 498.0) * 1e-4),
            backups: filled(lens, |i| ((i % 1009) as f32 - 504.0) * 1e-3),
            momentum: filled(lens, |i| ((i % 991) as f32 - 495.0) * 1e-5),
            exp_avgs: filled(lens, |i| ((i % 983) as f32 - 491.0) * 1e-5),
            exp_avg_sqs: filled(lens, |i| (i % 977) as f32 * 1e-8),
            max_exp_avg_sqs: filled(lens, |i| (i % 971) as f32 * 1e-8),
        }
    }

    fn elements(&self) -> u64 {
        self.weights.iter().map(|t| t.len() as u64).sum()
    }
}

fn views(tensors: &[Vec<f32>]) -> Vec<&[f32]> {
    tensors.iter().map(|t| t.as_slice()).collect()
}

fn views_mut(tensors: &mut [Vec<f32>]) -> Vec<&mut [f32]> {
    tensors.iter_mut().map(|t| t.as_mut_slice()).collect()
}

const SGD: SgdHyper = SgdHyper {
    lr: 0.1,
    momentum: 0.9,
    dampening: 0.0,
    weight_decay: 5e-4,
    nesterov: false,
    maximize: false,
    init_momentum: false,
};

const ADAM: AdamHyper = AdamHyper {
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 1e-2,
    decoupled: true,
    amsgrad: false,
    maximize: false,
    step: 10.0,
};

/// Runs every kernel (and the copy baselines) over `bufs` in one criterion group.
fn bench_layout(group: &mut BenchmarkGroup<'_, WallTime>, bufs: &mut Buffers) {
    let n = bufs.elements();
    let bytes = |per_element: u64| Throughput::Bytes(per_element * n);
    let Buffers {
        weights,
        grads,
        backups,
        momentum,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
    } = bufs;

    group.throughput(bytes(8));
    group.bench_function("copy_from_slice", |b| {
        let src = views(backups);
        let mut dst = views_mut(weights);
        b.iter(|| {
            for (d, s) in dst.iter_mut().zip(&src) {
                d.copy_from_slice(s);
            }
            black_box(&mut dst);
        })
    });
    group.bench_function("copy_parallel_chunks", |b| {
        let src = views(backups);
        let mut dst = views_mut(weights);
        b.iter(|| {
            let pairs: Vec<(&mut [f32], &[f32])> = dst
                .iter_mut()
                .zip(&src)
                .flat_map(|(d, s)| d.chunks_mut(CHUNK).zip(s.chunks(CHUNK)))
                .collect();
            pairs
                .into_par_iter()
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&mut dst);
        })
    });

    group.throughput(bytes(4));
    group.bench_function("sum_of_squares", |b| {
        let g = views(grads);
        b.iter(|| black_box(sum_of_squares::<f32>(black_box(&g))))
    });

    group.throughput(bytes(8));
    group.bench_function("sum_of_squares_adaptive", |b| {
        let (w, g) = (views(weights), views(grads));
        b.iter(|| black_box(sum_of_squares_adaptive::<f32>(&w, &g, 0.01).unwrap()))
    });

    group.throughput(bytes(16));
    group.bench_function("perturb", |b| {
        let g = views(grads);
        let (mut w, mut bk) = (views_mut(weights), views_mut(backups));
        // A tiny scale keeps the weights where they are over millions of calls.
        b.iter(|| perturb::<f32>(&mut w, &g, &mut bk, black_box(1e-9)).unwrap())
    });
    group.bench_function("perturb_adaptive", |b| {
        let g = views(grads);
        let (mut w, mut bk) = (views_mut(weights), views_mut(backups));
        b.iter(|| perturb_adaptive::<f32>(&mut w, &g, &mut bk, black_box(1e-9), 0.01).unwrap())
    });

    group.throughput(bytes(8));
    group.bench_function("copy", |b| {
        let bk = views(backups);
        let mut w = views_mut(weights);
        b.iter(|| copy::<f32>(&bk, &mut w).unwrap())
    });

    group.throughput(bytes(12));
    group.bench_function("restore_sgd", |b| {
        let (bk, g) = (views(backups), views(grads));
        let mut w = views_mut(weights);
        let h = SgdHyper {
            momentum: 0.0,
            ..SGD
        };
        b.iter(|| restore_sgd::<f32>(&mut w, &bk, &g, None, h).unwrap())
    });

    group.throughput(bytes(20));
    group.bench_function("restore_sgd_momentum", |b| {
        let (bk, g) = (views(backups), views(grads));
        let (mut w, mut buf) = (views_mut(weights), views_mut(momentum));
        b.iter(|| restore_sgd::<f32>(&mut w, &bk, &g, Some(&mut buf), SGD).unwrap())
    });

    group.throughput(bytes(28));
    group.bench_function("restore_adam", |b| {
        let (bk, g) = (views(backups), views(grads));
        let (mut w, mut m, mut v) = (
            views_mut(weights),
            views_mut(exp_avgs),
            views_mut(exp_avg_sqs),
        );
        b.iter(|| restore_adam::<f32>(&mut w, &bk, &g, &mut m, &mut v, None, ADAM).unwrap())
    });

    group.throughput(bytes(36));
    group.bench_function("restore_adam_amsgrad", |b| {
        let (bk, g) = (views(backups), views(grads));
        let (mut w, mut m, mut v) = (
            views_mut(weights),
            views_mut(exp_avgs),
            views_mut(exp_avg_sqs),
        );
        let mut x = views_mut(max_exp_avg_sqs);
        let h = AdamHyper {
            amsgrad: true,
            ..ADAM
        };
        b.iter(|| restore_adam::<f32>(&mut w, &bk, &g, &mut m, &mut v, Some(&mut x), h).unwrap())
    });
}

fn flat(c: &mut Criterion) {
    let mut bufs = Buffers::new(&[FLAT_LEN]);
    let mut group = c.benchmark_group("flat_f32_16M");
    bench_layout(&mut group, &mut bufs);
    group.finish();
}

fn list(c: &mut Criterion) {
    // 1,000 tensors of 16 to 4,111 elements (a spread of shapes like a small network's).
    let lens: Vec<usize> = (0..LIST_TENSORS).map(|i| 16 + (i * 7919) % 4096).collect();
    let mut bufs = Buffers::new(&lens);
    let mut group = c.benchmark_group("list_1000_tensors");
    bench_layout(&mut group, &mut bufs);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = flat, list
}
criterion_main!(benches);
