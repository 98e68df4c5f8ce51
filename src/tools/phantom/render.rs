//! Scanner model and rasterisation: pose (body → patient coordinates), slice geometry, lesion and tube
//! drawing with partial volume, reconstruction-kernel blur, quantum noise, circular field of view, and
//! quantisation to stored values.
//!
//! Owns: turning `Anatomy` + `LesionSpec`s into stored pixel values and label/lesion-id slices, and counting
//! the truth from exactly those voxels. Hands on: per-slice buffers to the DICOM writer (`dicom`) and the
//! label files. Never: chooses lesions or writes DICOM attributes.

use serde::{Deserialize, Serialize};

use super::anatomy::{seg_dist, Anatomy, Region, Tube, TubeKind};
use super::lesions::{blend_weight, bronchograms, modulated_rho, LesionClass, LesionSpec};
use super::rng::{fbm3, FastRng, Rng};

/// Acquisition and reconstruction parameters of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scanner {
    /// Pixel spacing (row = column), mm.
    pub pixel_spacing: f64,
    /// Reconstruction field of view (mm) = rows × pixel spacing.
    pub fov: f64,
    /// Slice thickness = spacing between slices, mm.
    pub slice_mm: f64,
    /// Patient z of the first slice (IM00001), mm; later slices go toward the feet.
    pub z_top: f64,
    /// Reconstruction centre offset (x, y), mm.
    pub recon_center: [f64; 2],
    /// Convolution kernel name as the vendor writes it.
    pub kernel: String,
    /// Whether the kernel is a sharp (lung/bone) kernel with edge enhancement.
    pub sharp: bool,
    /// Gaussian blur sigma of the kernel, mm.
    pub blur_mm: f64,
    /// Edge-enhancement strength of sharp kernels (unsharp mask weight).
    pub unsharp: f64,
    /// Image noise standard deviation in a uniform region, HU.
    pub noise_hu: f64,
    /// Tube voltage, kV.
    pub kvp: u32,
    /// Tube current, mA (lower means noisier).
    pub ma: u32,
    /// Signed (int16, intercept 0) or unsigned (uint16, intercept −1024) storage.
    pub signed: bool,
    /// Bits Stored (12 or 16).
    pub bits_stored: u16,
    /// Rescale Intercept.
    pub intercept: f64,
    /// Whether pixels outside the reconstruction circle are padding.
    pub circular: bool,
    /// Pixel Padding Value written outside the circle (stored value), if any.
    pub padding: Option<i32>,
    /// Manufacturer model name.
    pub model: String,
}

impl Scanner {
    /// Draws a protocol from the seed. `thickness` overrides the slice spacing; otherwise a typical value is
    /// chosen that keeps the scan range near a chest length (≤ ~420 mm).
    pub fn from_seed(seed: u64, size: usize, slices: usize, thickness: Option<f64>) -> Scanner {
        let mut r = Rng::stream(seed, "scanner");
        let ps512 = r.range(0.55, 0.9);
        let fov = 512.0 * ps512;
        let limit = (420.0 / slices.max(1) as f64).max(0.5);
        let typical = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0];
        let allowed: Vec<f64> = typical.iter().cloned().filter(|t| *t <= limit).collect();
        let slice_mm = match thickness {
            Some(t) => t,
            None if allowed.is_empty() => (limit * 20.0).floor() / 20.0,
            None => *r.pick(&allowed),
        };
        let sharp = r.chance(0.5);
        let (kernel, model) = match r.below(3) {
            0 => (if sharp { "B70f" } else { "B30f" }, "SOMATOM Phantom"),
            1 => (if sharp { "LUNG" } else { "STANDARD" }, "Revolution Phantom"),
            _ => (if sharp { "FC52" } else { "FC13" }, "Aquilion Phantom"),
        };
        let kvp = *r.pick(&[100u32, 120, 120, 120, 140]);
        let noise_hu = if sharp { r.range(18.0, 40.0) } else { r.range(8.0, 22.0) };
        let ma = (220.0 * (20.0 / noise_hu).powi(2)).round().clamp(30.0, 600.0) as u32;
        let signed = r.chance(0.5);
        let bits_stored = if r.chance(0.5) { 12 } else { 16 };
        let circular = r.chance(0.6);
        let padding = if signed && circular { Some(-2000) } else { None };
        let z_center = r.range(-260.0, -60.0);
        Scanner {
            pixel_spacing: fov / size as f64,
            fov,
            slice_mm,
            z_top: z_center + 0.5 * (slices.saturating_sub(1)) as f64 * slice_mm,
            recon_center: [r.range(-8.0, 8.0), r.range(-8.0, 8.0)],
            kernel: kernel.to_string(),
            sharp,
            blur_mm: if sharp { r.range(0.3, 0.5) } else { r.range(0.7, 1.05) },
            unsharp: if sharp { r.range(0.3, 0.6) } else { 0.0 },
            noise_hu,
            kvp,
            ma,
            signed,
            bits_stored,
            intercept: if signed { 0.0 } else { -1024.0 },
            circular,
            padding,
            model: model.to_string(),
        }
    }

    /// Smallest and largest stored value.
    pub fn stored_range(&self) -> (i32, i32) {
        if self.signed {
            let m = 1i32 << (self.bits_stored - 1);
            (-m, m - 1)
        } else {
            (0, (1i32 << self.bits_stored) - 1)
        }
    }
}

/// Rigid placement of the patient: patient (scanner) = R · body + t.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    /// Rotation matrix, rows.
    pub rotation: [[f64; 3]; 3],
    /// Translation, mm.
    pub translation: [f64; 3],
}

impl Pose {
    /// Rotation from yaw (about z), pitch (about x), roll (about y), degrees.
    pub fn rotation_from_deg(yaw: f64, pitch: f64, roll: f64) -> [[f64; 3]; 3] {
        let (a, b, c) = (yaw.to_radians(), pitch.to_radians(), roll.to_radians());
        let rz = [[a.cos(), -a.sin(), 0.0], [a.sin(), a.cos(), 0.0], [0.0, 0.0, 1.0]];
        let rx = [[1.0, 0.0, 0.0], [0.0, b.cos(), -b.sin()], [0.0, b.sin(), b.cos()]];
        let ry = [[c.cos(), 0.0, c.sin()], [0.0, 1.0, 0.0], [-c.sin(), 0.0, c.cos()]];
        mat(mat(rz, rx), ry)
    }

    /// Body → patient.
    pub fn apply(&self, b: [f64; 3]) -> [f64; 3] {
        let r = &self.rotation;
        let mut s = self.translation;
        for i in 0..3 {
            s[i] += r[i][0] * b[0] + r[i][1] * b[1] + r[i][2] * b[2];
        }
        s
    }

    /// Patient → body.
    pub fn inverse(&self, s: [f64; 3]) -> [f64; 3] {
        let r = &self.rotation;
        let d = [s[0] - self.translation[0], s[1] - self.translation[1], s[2] - self.translation[2]];
        [
            r[0][0] * d[0] + r[1][0] * d[1] + r[2][0] * d[2],
            r[0][1] * d[0] + r[1][1] * d[1] + r[2][1] * d[2],
            r[0][2] * d[0] + r[1][2] * d[1] + r[2][2] * d[2],
        ]
    }

    /// This pose moved by a rotation `rd` about patient point `about` followed by a shift `td`.
    pub fn moved(&self, rd: [[f64; 3]; 3], about: [f64; 3], td: [f64; 3]) -> Pose {
        let rotation = mat(rd, self.rotation);
        let d = [self.translation[0] - about[0], self.translation[1] - about[1], self.translation[2] - about[2]];
        let mut translation = [0.0; 3];
        for i in 0..3 {
            translation[i] = rd[i][0] * d[0] + rd[i][1] * d[1] + rd[i][2] * d[2] + about[i] + td[i];
        }
        Pose { rotation, translation }
    }
}

pub(crate) fn mat(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// Slice geometry in patient coordinates.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Rows = columns.
    pub size: usize,
    /// Number of slices.
    pub n: usize,
    /// Pixel spacing, mm.
    pub ps: f64,
    /// Slice spacing, mm.
    pub dz: f64,
    /// Patient x, y of pixel (0, 0).
    pub x0: f64,
    pub y0: f64,
    /// Patient z of slice 0.
    pub z_top: f64,
}

impl Geometry {
    /// Geometry of a scanner protocol.
    pub fn new(sc: &Scanner, size: usize, n: usize) -> Geometry {
        let ps = sc.pixel_spacing;
        Geometry {
            size,
            n,
            ps,
            dz: sc.slice_mm,
            x0: sc.recon_center[0] - sc.fov / 2.0 + ps / 2.0,
            y0: sc.recon_center[1] - sc.fov / 2.0 + ps / 2.0,
            z_top: sc.z_top,
        }
    }

    /// Patient z of slice i.
    pub fn z(&self, i: usize) -> f64 {
        self.z_top - i as f64 * self.dz
    }
}

/// A lesion prepared for fast per-pixel evaluation in patient coordinates.
struct Compiled {
    id: u16,
    class: LesionClass,
    /// patient → unit-sphere local: l = m · s + o
    m: [[f32; 3]; 3],
    o: [f32; 3],
    hu: f32,
    amp: f32,
    freq: f32,
    seed: u32,
    /// Patient-coordinate centre and reach (mm).
    c: [f64; 3],
    reach: f64,
    /// Septal pattern scale (cycles per local unit) for crazy paving.
    septa_freq: f32,
}

/// A tube in patient coordinates with its z span.
struct PTube {
    t: Tube,
    zlo: f32,
    zhi: f32,
    rmax: f32,
}

/// Everything needed to render any slice; shared read-only by the worker threads.
pub struct Scene {
    pub anatomy: Anatomy,
    pub pose: Pose,
    pub geom: Geometry,
    pub scanner: Scanner,
    /// Seed of the quantum noise realisation.
    pub noise_seed: u64,
    lesions: Vec<Compiled>,
    tubes: Vec<PTube>,
    /// 1D blur kernels (primary, edge-enhancement) and the pre-blur white-noise sigma.
    k1: Vec<f32>,
    k2: Vec<f32>,
    pre_sigma: f32,
}

/// Per-lesion voxel sums (integers, so thread order cannot change them).
#[derive(Debug, Clone, Default)]
pub struct LesionSums {
    pub voxels: u64,
    pub sum_hu: i64,
    pub sum_c: u64,
    pub sum_r: u64,
    pub sum_i: u64,
}

/// One rendered slice.
pub struct SliceOut {
    /// Stored pixel values (two's complement bit patterns when signed).
    pub stored: Vec<u16>,
    /// 0 background, 1 lung, 2 lesion.
    pub labels: Vec<u8>,
    /// Lesion id per pixel, 0 none.
    pub ids: Vec<u16>,
    /// Lung voxels (labels ≥ 1).
    pub lung_voxels: u64,
    /// HU sum over non-lesion lung voxels and their count.
    pub lung_sum_hu: i64,
    pub lung_only_voxels: u64,
    /// Per lesion id.
    pub lesions: Vec<LesionSums>,
}

fn gauss_kernel(sigma_px: f64) -> Vec<f32> {
    let s = sigma_px.max(0.05);
    let rad = (3.0 * s).ceil() as i32;
    let mut k: Vec<f64> = (-rad..=rad).map(|i| (-(i as f64).powi(2) / (2.0 * s * s)).exp()).collect();
    let sum: f64 = k.iter().sum();
    for v in k.iter_mut() {
        *v /= sum;
    }
    k.into_iter().map(|v| v as f32).collect()
}

fn pad_to(k: &[f32], len: usize) -> Vec<f64> {
    let off = (len - k.len()) / 2;
    let mut v = vec![0.0; len];
    for (i, x) in k.iter().enumerate() {
        v[off + i] = *x as f64;
    }
    v
}

impl Scene {
    /// Prepares a scene: compiles lesions and tubes into patient coordinates, sets up kernel and noise.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        anatomy: Anatomy,
        pose: Pose,
        scanner: Scanner,
        size: usize,
        n: usize,
        lesions: &[LesionSpec],
        tree_seed: u64,
        noise_seed: u64,
    ) -> Scene {
        let geom = Geometry::new(&scanner, size, n);
        let r = pose.rotation;
        let mut compiled = Vec::new();
        let mut tubes_body: Vec<Tube> = anatomy.trees(tree_seed);
        for s in lesions {
            let q = s.rotation();
            // l = diag(1/ax) Qᵀ Rᵀ (s − t) − diag(1/ax) Qᵀ c
            let mut m = [[0f64; 3]; 3];
            for k in 0..3 {
                for j in 0..3 {
                    // (Qᵀ Rᵀ)[k][j] = Σ_i Q[i][k] R[j][i]
                    m[k][j] = (0..3).map(|i| q[i][k] * r[j][i]).sum::<f64>() / s.axes[k];
                }
            }
            let t = pose.translation;
            let mut o = [0f64; 3];
            for k in 0..3 {
                let qc: f64 = (0..3).map(|i| q[i][k] * s.center[i]).sum::<f64>() / s.axes[k];
                o[k] = -(m[k][0] * t[0] + m[k][1] * t[1] + m[k][2] * t[2]) - qc;
            }
            let mean_ax = (s.axes[0] * s.axes[1] * s.axes[2]).cbrt();
            compiled.push(Compiled {
                id: s.id,
                class: s.class,
                m: m.map(|row| row.map(|v| v as f32)),
                o: o.map(|v| v as f32),
                hu: s.hu as f32,
                amp: s.shape_amp as f32,
                freq: s.shape_freq as f32,
                seed: s.shape_seed,
                c: pose.apply(s.center),
                reach: s.reach() + 1.0,
                septa_freq: (mean_ax / 9.0) as f32,
            });
            if s.class == LesionClass::Consolidation {
                for (a, b, rad) in bronchograms(s) {
                    tubes_body.push(Tube {
                        a: [a[0] as f32, a[1] as f32, a[2] as f32],
                        b: [b[0] as f32, b[1] as f32, b[2] as f32],
                        ra: rad as f32,
                        rb: (rad * 0.85) as f32,
                        kind: TubeKind::Bronchogram { lesion: s.id },
                    });
                }
            }
        }
        let tubes = tubes_body
            .into_iter()
            .map(|t| {
                let a = pose.apply([t.a[0] as f64, t.a[1] as f64, t.a[2] as f64]);
                let b = pose.apply([t.b[0] as f64, t.b[1] as f64, t.b[2] as f64]);
                let wall = match t.kind {
                    TubeKind::Airway { wall } => wall,
                    _ => 0.0,
                };
                let rmax = t.ra.max(t.rb) + wall + geom.ps as f32;
                let a = [a[0] as f32, a[1] as f32, a[2] as f32];
                let b = [b[0] as f32, b[1] as f32, b[2] as f32];
                PTube { t: Tube { a, b, ..t }, zlo: a[2].min(b[2]) - rmax, zhi: a[2].max(b[2]) + rmax, rmax }
            })
            .collect();
        let ps = geom.ps;
        let k1 = gauss_kernel(scanner.blur_mm / ps);
        let k2 = if scanner.unsharp > 0.0 { gauss_kernel(2.5 * scanner.blur_mm / ps) } else { Vec::new() };
        // noise std after filtering = pre_sigma · ‖K‖₂ with K = (1+α) g1⊗g1 − α g2⊗g2
        let norm = if k2.is_empty() {
            k1.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
        } else {
            let len = k2.len().max(k1.len());
            let (g1, g2) = (pad_to(&k1, len), pad_to(&k2, len));
            let a = scanner.unsharp;
            let n11: f64 = g1.iter().map(|v| v * v).sum();
            let n22: f64 = g2.iter().map(|v| v * v).sum();
            let n12: f64 = g1.iter().zip(&g2).map(|(x, y)| x * y).sum();
            ((1.0 + a).powi(2) * n11 * n11 - 2.0 * a * (1.0 + a) * n12 * n12 + a * a * n22 * n22).sqrt()
        };
        let pre_sigma = (scanner.noise_hu / norm) as f32;
        Scene { anatomy, pose, geom, scanner, noise_seed, lesions: compiled, tubes, k1, k2, pre_sigma }
    }

    /// Renders slice i: anatomy, lesions, tubes, then scanner blur/noise/quantisation.
    pub fn render(&self, i: usize, max_id: usize) -> SliceOut {
        let g = &self.geom;
        let n = g.size;
        let zs = g.z(i);
        let ps = g.ps;
        let mut hu = vec![0f32; n * n];
        let mut region = vec![Region::Air; n * n];
        // body coordinates of pixel (r, c) = inv(s) — linear in r and c
        let rt = self.pose.rotation;
        let b00 = self.pose.inverse([g.x0, g.y0, zs]);
        let dcol = [rt[0][0] * ps, rt[0][1] * ps, rt[0][2] * ps];
        let drow = [rt[1][0] * ps, rt[1][1] * ps, rt[1][2] * ps];
        for r in 0..n {
            let br = [b00[0] + drow[0] * r as f64, b00[1] + drow[1] * r as f64, b00[2] + drow[2] * r as f64];
            for c in 0..n {
                let b = [br[0] + dcol[0] * c as f64, br[1] + dcol[1] * c as f64, br[2] + dcol[2] * c as f64];
                let (h, reg) = self.anatomy.sample(b[0] as f32, b[1] as f32, b[2] as f32);
                hu[r * n + c] = h;
                region[r * n + c] = reg;
            }
        }
        // lesions
        let mut ids = vec![0u16; n * n];
        let mut best = vec![1f32; n * n];
        for l in &self.lesions {
            if (zs - l.c[2]).abs() > l.reach {
                continue;
            }
            let (c0, c1) = self.px_range(l.c[0] - l.reach, l.c[0] + l.reach, g.x0);
            let (r0, r1) = self.px_range(l.c[1] - l.reach, l.c[1] + l.reach, g.y0);
            for r in r0..r1 {
                let sy = (g.y0 + r as f64 * ps) as f32;
                for c in c0..c1 {
                    let idx = r * n + c;
                    if region[idx] != Region::Lung {
                        continue;
                    }
                    let s = [(g.x0 + c as f64 * ps) as f32, sy, zs as f32];
                    let mut lc = l.o;
                    for k in 0..3 {
                        lc[k] += l.m[k][0] * s[0] + l.m[k][1] * s[1] + l.m[k][2] * s[2];
                    }
                    let rho = modulated_rho(lc, l.amp, l.freq, l.seed);
                    let w = blend_weight(l.class, rho);
                    if w <= 0.0 {
                        continue;
                    }
                    let tex = fbm3(l.seed ^ 0xabc, lc[0] * 3.0, lc[1] * 3.0, lc[2] * 3.0, 2) - 0.5;
                    let mut target = l.hu + 70.0 * tex;
                    if l.class == LesionClass::CrazyPaving {
                        let f = l.septa_freq;
                        let sn = fbm3(l.seed ^ 0x5e97a, lc[0] * f, lc[1] * f, lc[2] * f, 2);
                        let line = (1.0 - (sn - 0.5).abs() / 0.035).max(0.0);
                        target += 320.0 * line;
                    }
                    hu[idx] += (target - hu[idx]) * w;
                    if rho < 1.0 && rho < best[idx] {
                        best[idx] = rho;
                        ids[idx] = l.id;
                    }
                }
            }
        }
        // tubes
        let zf = zs as f32;
        let psf = ps as f32;
        for pt in &self.tubes {
            if zf < pt.zlo || zf > pt.zhi {
                continue;
            }
            let t = &pt.t;
            let (mut t1, mut t2) = (0f32, 1f32);
            let dzt = t.b[2] - t.a[2];
            if dzt.abs() > 1e-4 {
                let u1 = (zf - pt.rmax - t.a[2]) / dzt;
                let u2 = (zf + pt.rmax - t.a[2]) / dzt;
                t1 = u1.min(u2).clamp(0.0, 1.0);
                t2 = u1.max(u2).clamp(0.0, 1.0);
            }
            let p1 = [t.a[0] + (t.b[0] - t.a[0]) * t1, t.a[1] + (t.b[1] - t.a[1]) * t1];
            let p2 = [t.a[0] + (t.b[0] - t.a[0]) * t2, t.a[1] + (t.b[1] - t.a[1]) * t2];
            let (c0, c1) =
                self.px_range((p1[0].min(p2[0]) - pt.rmax) as f64, (p1[0].max(p2[0]) + pt.rmax) as f64, g.x0);
            let (r0, r1) =
                self.px_range((p1[1].min(p2[1]) - pt.rmax) as f64, (p1[1].max(p2[1]) + pt.rmax) as f64, g.y0);
            for r in r0..r1 {
                let sy = (g.y0 + r as f64 * ps) as f32;
                for c in c0..c1 {
                    let idx = r * n + c;
                    let reg = region[idx];
                    if reg == Region::Air || reg == Region::Bone {
                        continue;
                    }
                    let p = [(g.x0 + c as f64 * ps) as f32, sy, zf];
                    let (d, tt) = seg_dist(p, t.a, t.b);
                    let rad = t.ra + (t.rb - t.ra) * tt;
                    match t.kind {
                        TubeKind::Vessel => {
                            if reg != Region::Lung && reg != Region::Mediastinum {
                                continue;
                            }
                            let cov = ((rad - d) / psf + 0.5).clamp(0.0, 1.0) * (2.0 * rad / psf).min(1.0);
                            if cov > 0.0 {
                                hu[idx] += (42.0 - hu[idx]) * cov;
                            }
                        }
                        TubeKind::Airway { wall } => {
                            let cw = ((rad + wall - d) / psf + 0.5).clamp(0.0, 1.0) * (2.0 * wall / psf).min(1.0);
                            if cw > 0.0 && reg == Region::Lung {
                                hu[idx] += (-40.0 - hu[idx]) * cw;
                            }
                            let cl = ((rad - d) / psf + 0.5).clamp(0.0, 1.0) * (2.0 * rad / psf).min(1.0);
                            if cl > 0.0 {
                                hu[idx] += (-1000.0 - hu[idx]) * cl;
                            }
                        }
                        TubeKind::Bronchogram { lesion } => {
                            if ids[idx] != lesion {
                                continue;
                            }
                            let cl = ((rad - d) / psf + 0.5).clamp(0.0, 1.0) * (2.0 * rad / psf).min(1.0);
                            if cl > 0.0 {
                                hu[idx] += (-960.0 - hu[idx]) * cl;
                            }
                        }
                    }
                }
            }
        }
        // scanner: white noise, kernel blur (correlates the noise), circular FOV, quantisation
        let mut rng = FastRng::new(Rng::indexed(self.noise_seed, "quantum", i as u64).next_u64());
        for v in hu.iter_mut() {
            *v += self.pre_sigma * rng.normal();
        }
        let img = if self.k2.is_empty() {
            blur(&hu, n, &self.k1)
        } else {
            let a = self.scanner.unsharp as f32;
            let b1 = blur(&hu, n, &self.k1);
            let b2 = blur(&hu, n, &self.k2);
            b1.iter().zip(&b2).map(|(x, y)| (1.0 + a) * x - a * y).collect()
        };
        let (lo, hi) = self.scanner.stored_range();
        let icpt = self.scanner.intercept as i32;
        let rad2 = (self.scanner.fov / 2.0).powi(2);
        let (cx, cy) = (self.scanner.recon_center[0], self.scanner.recon_center[1]);
        let mut out = SliceOut {
            stored: vec![0u16; n * n],
            labels: vec![0u8; n * n],
            ids,
            lung_voxels: 0,
            lung_sum_hu: 0,
            lung_only_voxels: 0,
            lesions: vec![LesionSums::default(); max_id + 1],
        };
        for r in 0..n {
            let dy = g.y0 + r as f64 * ps - cy;
            for c in 0..n {
                let idx = r * n + c;
                let dx = g.x0 + c as f64 * ps - cx;
                if self.scanner.circular && dx * dx + dy * dy > rad2 {
                    let pad = self.scanner.padding.unwrap_or(lo);
                    out.stored[idx] = pad as i16 as u16;
                    out.ids[idx] = 0;
                    continue;
                }
                let s = ((img[idx].round() as i32) - icpt).clamp(lo, hi);
                out.stored[idx] = if self.scanner.signed { s as i16 as u16 } else { s as u16 };
                let h = (s + icpt) as i64;
                if region[idx] == Region::Lung {
                    out.lung_voxels += 1;
                    let id = out.ids[idx];
                    if id > 0 {
                        out.labels[idx] = 2;
                        let e = &mut out.lesions[id as usize];
                        e.voxels += 1;
                        e.sum_hu += h;
                        e.sum_c += c as u64;
                        e.sum_r += r as u64;
                        e.sum_i += i as u64;
                    } else {
                        out.labels[idx] = 1;
                        out.lung_sum_hu += h;
                        out.lung_only_voxels += 1;
                    }
                }
            }
        }
        out
    }

    /// Pixel index range [lo, hi) covering patient coordinates [a, b] along one axis starting at `origin`.
    fn px_range(&self, a: f64, b: f64, origin: f64) -> (usize, usize) {
        let n = self.geom.size as f64;
        let lo = ((a - origin) / self.geom.ps).floor().clamp(0.0, n) as usize;
        let hi = (((b - origin) / self.geom.ps).ceil() + 1.0).clamp(0.0, n) as usize;
        (lo, hi)
    }
}

/// Separable blur with edge replication.
fn blur(src: &[f32], n: usize, k: &[f32]) -> Vec<f32> {
    let rad = (k.len() / 2) as isize;
    let mut tmp = vec![0f32; n * n];
    for r in 0..n {
        let row = &src[r * n..(r + 1) * n];
        for c in 0..n {
            let mut acc = 0f32;
            for (j, w) in k.iter().enumerate() {
                let cc = (c as isize + j as isize - rad).clamp(0, n as isize - 1) as usize;
                acc += w * row[cc];
            }
            tmp[r * n + c] = acc;
        }
    }
    let mut out = vec![0f32; n * n];
    for (j, w) in k.iter().enumerate() {
        for r in 0..n {
            let rr = (r as isize + j as isize - rad).clamp(0, n as isize - 1) as usize;
            let src_row = &tmp[rr * n..(rr + 1) * n];
            let dst = &mut out[r * n..(r + 1) * n];
            for c in 0..n {
                dst[c] += w * src_row[c];
            }
        }
    }
    out
}
