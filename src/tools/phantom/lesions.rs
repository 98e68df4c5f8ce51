//! COVID-19 pneumonia lesions: ground-glass opacities, consolidation with air bronchograms, crazy paving.
//!
//! Owns: the lesion description (`LesionSpec`, stored in truth.json so a follow-up can regenerate it), the
//! shape function shared by placement and rendering, placement to a target involvement, and follow-up
//! evolution (grow / shrink / resolve / new / GGO→consolidation). Hands on: specs to `render`.
//! Never: decides what the truth volumes are — those are counted from rasterised voxels by `render`.

use serde::{Deserialize, Serialize};

use super::anatomy::{add, norm, perturb, scale, Anatomy};
use super::rng::{fbm3, Rng};
use super::Severity;

/// Radiological lesion class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LesionClass {
    /// Ground-glass opacity: hazy, soft-edged, vessels visible through it.
    Ggo,
    /// Consolidation: soft-tissue density with air bronchograms.
    Consolidation,
    /// Ground glass with superimposed thickened septal lines.
    CrazyPaving,
}

impl LesionClass {
    /// Name used in truth.json.
    pub fn name(self) -> &'static str {
        match self {
            LesionClass::Ggo => "ggo",
            LesionClass::Consolidation => "consolidation",
            LesionClass::CrazyPaving => "crazy_paving",
        }
    }
}

/// One lesion in body coordinates; everything needed to rasterise it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LesionSpec {
    /// Lesion id (≥ 1), stable across follow-ups of the same patient.
    pub id: u16,
    /// Radiological class.
    pub class: LesionClass,
    /// Centre, body coordinates (mm).
    pub center: [f64; 3],
    /// Ellipsoid semi-axes before shape modulation (mm).
    pub axes: [f64; 3],
    /// Orientation: rotations about z, y, x (radians).
    pub angles: [f64; 3],
    /// Target HU at the lesion core.
    pub hu: f64,
    /// Shape irregularity: relative radius modulation amplitude.
    pub shape_amp: f64,
    /// Shape modulation frequency (cycles per unit radius).
    pub shape_freq: f64,
    /// Seed of the shape noise, bronchograms and septal pattern.
    pub shape_seed: u32,
}

impl LesionSpec {
    /// Rotation matrix (columns = lesion axes in body coordinates).
    pub fn rotation(&self) -> [[f64; 3]; 3] {
        let (a, b, c) = (self.angles[0], self.angles[1], self.angles[2]);
        let rz = [[a.cos(), -a.sin(), 0.0], [a.sin(), a.cos(), 0.0], [0.0, 0.0, 1.0]];
        let ry = [[b.cos(), 0.0, b.sin()], [0.0, 1.0, 0.0], [-b.sin(), 0.0, b.cos()]];
        let rx = [[1.0, 0.0, 0.0], [0.0, c.cos(), -c.sin()], [0.0, c.sin(), c.cos()]];
        matmul(matmul(rz, ry), rx)
    }

    /// Body point → unit-sphere lesion coordinates.
    pub fn to_local(&self, p: [f64; 3]) -> [f32; 3] {
        let q = self.rotation();
        let d = [p[0] - self.center[0], p[1] - self.center[1], p[2] - self.center[2]];
        let mut l = [0f32; 3];
        for (k, lk) in l.iter_mut().enumerate() {
            *lk = ((q[0][k] * d[0] + q[1][k] * d[1] + q[2][k] * d[2]) / self.axes[k]) as f32;
        }
        l
    }

    /// Unit-sphere lesion coordinates → body point.
    pub fn to_body(&self, l: [f64; 3]) -> [f64; 3] {
        let q = self.rotation();
        let s = [l[0] * self.axes[0], l[1] * self.axes[1], l[2] * self.axes[2]];
        let mut p = self.center;
        for (i, pi) in p.iter_mut().enumerate() {
            *pi += q[i][0] * s[0] + q[i][1] * s[1] + q[i][2] * s[2];
        }
        p
    }

    /// Largest extent from the centre including shape modulation (mm).
    pub fn reach(&self) -> f64 {
        self.axes.iter().cloned().fold(0.0, f64::max) / (1.0 - self.shape_amp).max(0.3)
    }
}

/// Shape-modulated normalised radius at local coordinates: the lesion is where this is < 1.
#[inline]
pub fn modulated_rho(l: [f32; 3], amp: f32, freq: f32, seed: u32) -> f32 {
    let rho = (l[0] * l[0] + l[1] * l[1] + l[2] * l[2]).sqrt();
    if rho > 1.0 / (1.0 - amp).max(0.3) {
        return rho;
    }
    let n = fbm3(seed, l[0] * freq + 17.0, l[1] * freq + 31.0, l[2] * freq + 47.0, 2);
    rho * (1.0 + amp * (2.0 * n - 1.0))
}

/// HU blend weight of a lesion at modulated radius ρ': 0.5 exactly at ρ' = 1 (the label boundary).
#[inline]
pub fn blend_weight(class: LesionClass, rho: f32) -> f32 {
    let half = match class {
        LesionClass::Consolidation => 0.05,
        _ => 0.14,
    };
    ((1.0 + half - rho) / (2.0 * half)).clamp(0.0, 1.0)
}

fn matmul(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// Coarse lung sampling grid for placement: estimates involvement before rasterisation.
struct LungGrid {
    /// Grid origin (body mm) and step.
    origin: [f64; 3],
    step: f64,
    dims: [usize; 3],
    /// Index into `covered` per cell, or u32::MAX if not lung.
    cell: Vec<u32>,
    /// Whether each lung cell is covered by a lesion.
    covered: Vec<bool>,
    /// Lung cell count.
    n_lung: usize,
    n_covered: usize,
}

impl LungGrid {
    fn new(anat: &Anatomy, z_lo: f64, z_hi: f64) -> LungGrid {
        let step = 3.0;
        let origin = [-(anat.a as f64), -(anat.b as f64), z_lo];
        let dims = [
            (2.0 * anat.a as f64 / step) as usize + 1,
            (2.0 * anat.b as f64 / step) as usize + 1,
            ((z_hi - z_lo) / step).max(0.0) as usize + 1,
        ];
        let mut cell = vec![u32::MAX; dims[0] * dims[1] * dims[2]];
        let mut n = 0u32;
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let p = [origin[0] + i as f64 * step, origin[1] + j as f64 * step, origin[2] + k as f64 * step];
                    if anat.lung_at(p) {
                        cell[(k * dims[1] + j) * dims[0] + i] = n;
                        n += 1;
                    }
                }
            }
        }
        LungGrid { origin, step, dims, cell, covered: vec![false; n as usize], n_lung: n as usize, n_covered: 0 }
    }

    fn point(&self, idx: usize) -> [f64; 3] {
        let i = idx % self.dims[0];
        let j = (idx / self.dims[0]) % self.dims[1];
        let k = idx / (self.dims[0] * self.dims[1]);
        [
            self.origin[0] + i as f64 * self.step,
            self.origin[1] + j as f64 * self.step,
            self.origin[2] + k as f64 * self.step,
        ]
    }

    /// Marks the lung cells inside the lesion; returns how many lung cells it touches (new or not).
    fn cover(&mut self, s: &LesionSpec, mark: bool) -> (usize, usize) {
        let reach = s.reach();
        let lo = [s.center[0] - reach, s.center[1] - reach, s.center[2] - reach];
        let mut touched = 0;
        let mut fresh = 0;
        let to_idx = |v: f64, d: usize| ((v / self.step).floor().max(0.0) as usize).min(d.saturating_sub(1));
        let i0 = to_idx(lo[0] - self.origin[0], self.dims[0]);
        let j0 = to_idx(lo[1] - self.origin[1], self.dims[1]);
        let k0 = to_idx(lo[2] - self.origin[2], self.dims[2]);
        let i1 = to_idx(lo[0] + 2.0 * reach - self.origin[0] + self.step, self.dims[0]);
        let j1 = to_idx(lo[1] + 2.0 * reach - self.origin[1] + self.step, self.dims[1]);
        let k1 = to_idx(lo[2] + 2.0 * reach - self.origin[2] + self.step, self.dims[2]);
        for k in k0..=k1 {
            for j in j0..=j1 {
                for i in i0..=i1 {
                    let idx = (k * self.dims[1] + j) * self.dims[0] + i;
                    let c = self.cell[idx];
                    if c == u32::MAX {
                        continue;
                    }
                    let l = s.to_local(self.point(idx));
                    if modulated_rho(l, s.shape_amp as f32, s.shape_freq as f32, s.shape_seed) < 1.0 {
                        touched += 1;
                        if !self.covered[c as usize] {
                            fresh += 1;
                            if mark {
                                self.covered[c as usize] = true;
                                self.n_covered += 1;
                            }
                        }
                    }
                }
            }
        }
        (touched, fresh)
    }

    /// A random lung cell centre, biased toward peripheral, posterior and lower lung.
    fn pick_site(&self, anat: &Anatomy, rng: &mut Rng, z_mid: f64) -> Option<[f64; 3]> {
        if self.n_lung == 0 {
            return None;
        }
        for _ in 0..400 {
            let idx = rng.below(self.cell.len() as u64) as usize;
            if self.cell[idx] == u32::MAX {
                continue;
            }
            let p = self.point(idx);
            let mut w = 0.25;
            // posterior and lower
            w += 0.35 * ((p[1] / anat.b as f64) + 0.5).clamp(0.0, 1.0);
            w += 0.25 * ((z_mid - p[2]) / (0.5 * anat.h as f64) + 0.5).clamp(0.0, 1.0);
            // peripheral: a probe 14 mm outward (laterally / posteriorly) leaves the lung
            let sx = p[0].signum();
            let probes = [[sx * 14.0, 0.0, 0.0], [0.0, 14.0, 0.0], [sx * 10.0, -10.0, 0.0], [0.0, 0.0, -14.0]];
            let out = probes.iter().filter(|o| !anat.lung_at(add(p, **o))).count();
            w += 0.4 * (out as f64 / 2.0).min(1.0);
            if rng.f64() * 1.25 < w {
                return Some(p);
            }
        }
        None
    }
}

/// Target lesion fraction of lung volume for a severity (drawn within its band).
fn target_fraction(sev: Severity, rng: &mut Rng) -> f64 {
    match sev {
        Severity::None => 0.0,
        Severity::Mild => rng.range(0.008, 0.04),
        Severity::Moderate => rng.range(0.07, 0.17),
        Severity::Severe => rng.range(0.25, 0.45),
    }
}

fn draw_class(sev: Severity, rng: &mut Rng) -> LesionClass {
    let w = match sev {
        Severity::Mild => [0.75, 0.1, 0.15],
        Severity::Moderate => [0.5, 0.25, 0.25],
        _ => [0.35, 0.35, 0.3],
    };
    let x = rng.f64();
    if x < w[0] {
        LesionClass::Ggo
    } else if x < w[0] + w[1] {
        LesionClass::Consolidation
    } else {
        LesionClass::CrazyPaving
    }
}

/// Core HU for a class.
pub fn class_hu(class: LesionClass, rng: &mut Rng) -> f64 {
    match class {
        LesionClass::Ggo => rng.range(-720.0, -330.0),
        LesionClass::Consolidation => rng.range(-90.0, 50.0),
        LesionClass::CrazyPaving => rng.range(-650.0, -450.0),
    }
}

/// A lesion of roughly equivalent radius `r` (mm) at `c`.
fn make_lesion(id: u16, class: LesionClass, c: [f64; 3], r: f64, rng: &mut Rng) -> LesionSpec {
    let e = [rng.range(0.75, 1.3), rng.range(0.75, 1.3), rng.range(0.8, 1.5)];
    let g = (e[0] * e[1] * e[2]).cbrt();
    LesionSpec {
        id,
        class,
        center: c,
        axes: [r * e[0] / g, r * e[1] / g, r * e[2] / g],
        angles: [rng.range(0.0, std::f64::consts::TAU), rng.range(-0.5, 0.5), rng.range(-0.5, 0.5)],
        hu: class_hu(class, rng),
        shape_amp: if r < 6.0 { rng.range(0.1, 0.2) } else { rng.range(0.25, 0.45) },
        shape_freq: rng.range(1.4, 2.8),
        shape_seed: rng.next_u64() as u32,
    }
}

/// Places lesions in the scanned lung (body z in [z_lo, z_hi]) until the severity's involvement is reached.
pub fn place(anat: &Anatomy, seed: u64, sev: Severity, z_lo: f64, z_hi: f64) -> Vec<LesionSpec> {
    let mut rng = Rng::stream(seed, "lesions");
    if sev == Severity::None {
        return Vec::new();
    }
    let target = target_fraction(sev, &mut rng);
    let mut grid = LungGrid::new(anat, z_lo, z_hi);
    let cell_ml = grid.step.powi(3) / 1000.0;
    let z_mid = 0.5 * (z_lo + z_hi);
    let r_max = match sev {
        Severity::Mild => 22.0,
        Severity::Moderate => 42.0,
        _ => 70.0,
    };
    let mut forced: Vec<LesionClass> = match sev {
        Severity::Mild => vec![LesionClass::Ggo],
        _ => vec![LesionClass::Ggo, LesionClass::Consolidation, LesionClass::CrazyPaving],
    };
    // shuffle forced classes
    for i in (1..forced.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        forced.swap(i, j);
    }
    forced.reverse();
    let max_n: usize = match sev {
        Severity::Mild => 2 + rng.below(5) as usize,
        Severity::Moderate => 4 + rng.below(9) as usize,
        _ => 6 + rng.below(12) as usize,
    };
    let mut out = Vec::new();
    let mut tries = 0;
    while (grid.n_covered as f64) < target * grid.n_lung as f64 && tries < 300 && out.len() < max_n + 6 {
        tries += 1;
        let Some(c) = grid.pick_site(anat, &mut rng, z_mid) else { break };
        let rem_ml = (target * grid.n_lung as f64 - grid.n_covered as f64) * cell_ml;
        let slots = max_n.saturating_sub(out.len()).max(1) as f64;
        let share_ml = rem_ml / slots * rng.range(0.6, 1.7);
        // equivalent radius of this lesion's share (mm), allowing for pleural clipping
        let r_share = (3.0 * share_ml * 1000.0 * 1.5 / (4.0 * std::f64::consts::PI)).cbrt();
        let r = if slots > 2.0 && rng.chance(0.15) { rng.range(2.6, 5.0) } else { r_share.clamp(2.6, r_max) };
        let class = forced.pop().unwrap_or_else(|| draw_class(sev, &mut rng));
        let mut s = make_lesion(out.len() as u16 + 1, class, c, r, &mut rng);
        // keep whole lesion inside the scanned range
        let reach = s.reach();
        if s.center[2] - reach < z_lo + 4.0 || s.center[2] + reach > z_hi - 4.0 {
            let room = ((s.center[2] - z_lo - 4.0).min(z_hi - 4.0 - s.center[2])).max(0.0);
            if room < 3.0 {
                forced.push(class);
                continue;
            }
            let k = (room / reach).min(1.0);
            for a in s.axes.iter_mut() {
                *a *= k;
            }
        }
        let (touched, fresh) = grid.cover(&s, false);
        if touched == 0 || (fresh as f64) < 0.5 * touched as f64 {
            forced.push(class);
            continue;
        }
        grid.cover(&s, true);
        s.id = out.len() as u16 + 1;
        out.push(s);
    }
    out
}

/// What a follow-up intends to do with a prior lesion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Grow,
    Shrink,
    Stable,
    Resolve,
}

/// Evolves prior lesions into a follow-up: returns the new specs and, per prior lesion, what was intended.
pub fn evolve(
    anat: &Anatomy,
    prior: &[LesionSpec],
    seed: u64,
    z_lo: f64,
    z_hi: f64,
) -> (Vec<LesionSpec>, Vec<(u16, Intent)>) {
    let mut rng = Rng::stream(seed, "evolve");
    let mut intents: Vec<Intent> = prior
        .iter()
        .map(|_| {
            let x = rng.f64();
            if x < 0.32 {
                Intent::Grow
            } else if x < 0.57 {
                Intent::Shrink
            } else if x < 0.77 {
                Intent::Stable
            } else {
                Intent::Resolve
            }
        })
        .collect();
    // every kind of change at least once when there are enough lesions
    if prior.len() >= 4 {
        let mut order: Vec<usize> = (0..prior.len()).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        for (k, it) in [Intent::Grow, Intent::Shrink, Intent::Stable, Intent::Resolve].into_iter().enumerate() {
            intents[order[k]] = it;
        }
    }
    let mut out = Vec::new();
    let mut record = Vec::new();
    for (s, &it) in prior.iter().zip(&intents) {
        record.push((s.id, it));
        let mut n = s.clone();
        match it {
            Intent::Resolve => continue,
            Intent::Stable => {}
            Intent::Grow => {
                let k = rng.range(1.6, 3.0).cbrt();
                for a in n.axes.iter_mut() {
                    *a *= k;
                }
                if n.class != LesionClass::Consolidation && rng.chance(0.5) {
                    n.class = LesionClass::Consolidation;
                    n.hu = class_hu(LesionClass::Consolidation, &mut rng);
                }
                // a grown lesion stays within the scanned range
                let reach = n.reach();
                let room = (n.center[2] - z_lo - 3.0).min(z_hi - 3.0 - n.center[2]);
                if reach > room && room > 0.0 {
                    let k = (room / reach).max(k.recip());
                    for a in n.axes.iter_mut() {
                        *a *= k;
                    }
                }
            }
            Intent::Shrink => {
                let k = rng.range(0.2, 0.55).cbrt();
                for a in n.axes.iter_mut() {
                    *a *= k;
                }
                if n.class == LesionClass::Consolidation && rng.chance(0.4) {
                    n.class = LesionClass::Ggo;
                    n.hu = class_hu(LesionClass::Ggo, &mut rng);
                }
            }
        }
        out.push(n);
    }
    // new lesions
    let grid = LungGrid::new(anat, z_lo, z_hi);
    let z_mid = 0.5 * (z_lo + z_hi);
    let mut next_id = prior.iter().map(|s| s.id).max().unwrap_or(0) + 1;
    let n_new = 1 + rng.below(3);
    for _ in 0..n_new {
        for _ in 0..20 {
            let Some(c) = grid.pick_site(anat, &mut rng, z_mid) else { break };
            let r = rng.range(4.0, 14.0);
            let class = if rng.chance(0.7) { LesionClass::Ggo } else { LesionClass::CrazyPaving };
            let s = make_lesion(next_id, class, c, r, &mut rng);
            if s.center[2] - s.reach() < z_lo + 3.0 || s.center[2] + s.reach() > z_hi - 3.0 {
                continue;
            }
            // keep new lesions apart from existing ones so their identity is unambiguous
            let clear = out.iter().all(|o: &LesionSpec| {
                let d = super::anatomy::sub(o.center, s.center);
                (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt() > o.reach() + s.reach() + 3.0
            });
            if !clear {
                continue;
            }
            out.push(s);
            next_id += 1;
            break;
        }
    }
    (out, record)
}

/// Air bronchograms of a consolidation: a small branching air tree in body coordinates (a, b, radius).
pub fn bronchograms(s: &LesionSpec) -> Vec<([f64; 3], [f64; 3], f64)> {
    let mut rng = Rng::indexed(s.shape_seed as u64, "bronchogram", s.id as u64);
    let mut out = Vec::new();
    let n_roots = 1 + rng.below(2);
    let rmin = s.axes.iter().cloned().fold(f64::MAX, f64::min);
    for _ in 0..n_roots {
        // start near the lesion surface on one side, run through the core
        let start_l = scale(rng.unit3(), 0.75);
        let dir_l = norm(scale(start_l, -1.0));
        let mut stack = vec![(start_l, dir_l, 0.55, (0.35 * rmin).clamp(0.9, 2.0), 0u32)];
        while let Some((p, d, len, r, depth)) = stack.pop() {
            let e = add(p, scale(d, len));
            out.push((s.to_body(p), s.to_body(e), r));
            if depth < 2 {
                for _ in 0..2 {
                    let spread = rng.range(0.4, 0.8);
                    let cd = perturb(&mut rng, d, spread);
                    stack.push((e, cd, len * 0.6, (r * 0.75).max(0.6), depth + 1));
                }
            }
        }
    }
    out
}
