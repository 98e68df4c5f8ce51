//! Procedural chest anatomy in body coordinates: body wall, ribs, spine, sternum, mediastinum, heart, aorta,
//! diaphragm domes with liver/spleen/stomach below, two lungs with parenchymal texture, and the tubular trees
//! (pulmonary vessels, airways) that are rasterised separately.
//!
//! Body coordinates are millimetres, x toward the patient's left, y posterior, z superior (DICOM LPS axes),
//! origin on the body axis at the lung apex level. Owns: what tissue (HU) and region a body point holds.
//! Hands on: `sample` for the renderer and lesion placement, `Tube` lists for the renderer.
//! Never: scanner geometry, noise or blur (that is `render`).

use super::rng::{fbm3, noise3, Rng};

/// What a point belongs to; decides labels and where tubes may be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Region {
    /// Outside the body.
    Air = 0,
    /// Skin, fat, muscle, pleura, neck soft tissue.
    Wall = 1,
    /// Cortical/cancellous bone and cartilage.
    Bone = 2,
    /// Mediastinal fat and soft tissue between the lungs.
    Mediastinum = 3,
    /// Lung parenchyma (label 1).
    Lung = 4,
    /// Below the diaphragm.
    Abdomen = 5,
    /// Heart and aorta.
    Heart = 6,
}

/// What a tube is, which decides its HU and where it may be drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TubeKind {
    /// Blood vessel: soft tissue HU, drawn in lung and mediastinum.
    Vessel,
    /// Airway with a wall of the given thickness (mm); lumen is air.
    Airway { wall: f32 },
    /// Air bronchogram: air tube drawn only inside the lesion with this id.
    Bronchogram { lesion: u16 },
}

/// A tapering cylinder between two points.
#[derive(Debug, Clone, Copy)]
pub struct Tube {
    /// Start point, mm.
    pub a: [f32; 3],
    /// End point, mm.
    pub b: [f32; 3],
    /// Radius at `a`, mm.
    pub ra: f32,
    /// Radius at `b`, mm.
    pub rb: f32,
    /// Vessel, airway or bronchogram.
    pub kind: TubeKind,
}

/// One patient's anatomy; all sizes in millimetres, drawn from the seed.
#[derive(Debug, Clone)]
pub struct Anatomy {
    /// Lung height, apex to the deepest costophrenic recess.
    pub h: f32,
    /// Body half width (left-right) at the chest.
    pub a: f32,
    /// Body half depth (anterior-posterior) at the chest.
    pub b: f32,
    /// Squareness of the body outline anteriorly / posteriorly.
    bulge: [f32; 2],
    /// Subcutaneous fat thickness.
    fat0: f32,
    /// Muscle layer thickness.
    musc0: f32,
    /// Extra posterior muscle near the midline (paraspinal).
    paraspinal: f32,
    /// Vertebral body centre y and radius; vertebra height.
    y_vb: f32,
    r_vb: f32,
    vert_h: f32,
    vert_z0: f32,
    /// First rib's posterior z, spacing between ribs, anterior drop.
    rib_z0: f32,
    rib_gap: f32,
    rib_drop: f32,
    /// Heart ellipsoid centre, semi-axes and in-plane rotation (cos, sin).
    heart_c: [f32; 3],
    heart_ax: [f32; 3],
    heart_rot: [f32; 2],
    /// Aorta centre line (points) and radius at each point.
    aorta: Vec<([f32; 3], f32)>,
    /// Trachea and main bronchi: (a, b, radius incl. wall).
    central_airways: Vec<([f32; 3], [f32; 3], f32)>,
    /// Pulmonary trunk → hilum arteries: (a, b, radius at a, radius at b); mediastinal, never lung.
    pulmonary_arteries: Vec<([f32; 3], [f32; 3], f32, f32)>,
    /// Esophagus centre (x, y) and radius.
    esoph: [f32; 3],
    /// Dome heights above the lung base (right, left) and dome half-extent in x, y; dome centre y.
    dome_h: [f32; 2],
    dome_ext: [f32; 2],
    dome_cx: f32,
    dome_cy: f32,
    /// Lung apex: depth over which the lung grows to full size, apex centre x (abs), y, radii.
    apex_u: f32,
    apex_c: [f32; 2],
    apex_r: [f32; 2],
    /// Mean parenchyma HU, posterior (dependent) density gradient, texture amplitude.
    lung_hu: f32,
    lung_grad: f32,
    lung_tex: f32,
    /// Tissue HUs.
    fat_hu: f32,
    muscle_hu: f32,
    liver_hu: f32,
    /// Noise seed for textures.
    tex_seed: u32,
    /// Hilum positions (right, left).
    pub hilum: [[f32; 3]; 2],
}

#[inline]
fn smooth(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Distance from p to segment ab and the position t ∈ [0,1] of the closest point.
#[inline]
pub fn seg_dist(p: [f32; 3], a: [f32; 3], b: [f32; 3]) -> (f32, f32) {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
    let l2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    let t = if l2 > 0.0 { ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / l2).clamp(0.0, 1.0) } else { 0.0 };
    let d = [ap[0] - ab[0] * t, ap[1] - ab[1] * t, ap[2] - ab[2] * t];
    ((d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt(), t)
}

impl Anatomy {
    /// Draws a patient from the seed; `fov` (mm) bounds the body width so it fits the reconstruction circle.
    pub fn new(seed: u64, fov: f64) -> Anatomy {
        let mut r = Rng::stream(seed, "anatomy");
        let a = (fov / 2.0 * r.range(0.74, 0.86) - 8.0) as f32;
        let b = a * r.range(0.64, 0.76) as f32;
        let h = r.range(225.0, 280.0) as f32;
        let r_vb = r.range(15.0, 19.0) as f32;
        let y_vb = b - r.range(58.0, 68.0) as f32;
        let heart_c =
            [a * r.range(0.15, 0.24) as f32, -b * r.range(0.12, 0.22) as f32, -h * r.range(0.68, 0.74) as f32];
        let heart_ax = [a * r.range(0.36, 0.44) as f32, b * r.range(0.40, 0.48) as f32, h * r.range(0.19, 0.23) as f32];
        let ang = -r.range(0.35, 0.6) as f32;
        let y_tr = y_vb - r_vb - r.range(16.0, 22.0) as f32;
        let carina = [r.range(-3.0, 3.0) as f32, y_tr + 6.0, -h * r.range(0.30, 0.36) as f32];
        let hz = -h * r.range(0.40, 0.46) as f32;
        let hx = a * r.range(0.20, 0.25) as f32;
        let hilum = [[-hx, y_tr + 14.0, hz], [hx * 0.95, y_tr + 16.0, hz + 6.0]];
        let tr_r = r.range(8.0, 10.0) as f32;
        let central_airways = vec![
            ([carina[0] * 0.5, y_tr - 6.0, 90.0], carina, tr_r + 2.0),
            (carina, [-hx + 8.0, hilum[0][1] - 2.0, hz + 4.0], 0.68 * tr_r + 1.6),
            (carina, [hx - 8.0, hilum[1][1] - 2.0, hz + 2.0], 0.62 * tr_r + 1.5),
        ];
        let ao_r = r.range(12.0, 15.0) as f32;
        let asc = [-a * 0.04, heart_c[1] - b * 0.05, -h * 0.5];
        let aorta = vec![
            ([asc[0] + 6.0, asc[1] + 8.0, -h * 0.62], ao_r),
            ([asc[0], asc[1], -h * 0.42], ao_r),
            ([asc[0] + 4.0, asc[1] + 6.0, -h * 0.24], ao_r * 0.95),
            ([18.0, y_tr - 4.0, -h * 0.17], ao_r * 0.9),
            ([r_vb + 6.0, y_vb - r_vb * 0.6, -h * 0.25], ao_r * 0.85),
            ([r_vb + 4.0, y_vb - r_vb * 0.7, -h * 0.6], ao_r * 0.8),
            ([r_vb * 0.3, y_vb - r_vb - 6.0, -h * 1.4], ao_r * 0.75),
        ];
        let trunk = [heart_c[0] + 0.1 * a, heart_c[1] - 0.1 * b, heart_c[2] + heart_ax[2] * 0.9];
        let pulmonary_arteries = hilum.iter().map(|hl| (trunk, [hl[0], hl[1] - 8.0, hl[2] + 4.0], 11.0, 9.0)).collect();
        Anatomy {
            pulmonary_arteries,
            h,
            a,
            b,
            bulge: [r.range(0.02, 0.08) as f32, r.range(0.08, 0.16) as f32],
            fat0: r.range(5.0, 24.0) as f32,
            musc0: r.range(9.0, 15.0) as f32,
            paraspinal: r.range(30.0, 42.0) as f32,
            y_vb,
            r_vb,
            vert_h: r.range(22.0, 27.0) as f32,
            vert_z0: r.range(0.0, 25.0) as f32,
            rib_z0: h * r.range(0.02, 0.08) as f32,
            rib_gap: h * r.range(0.085, 0.095) as f32,
            rib_drop: r.range(95.0, 125.0) as f32,
            heart_c,
            heart_ax,
            heart_rot: [ang.cos(), ang.sin()],
            aorta,
            central_airways,
            esoph: [r.range(2.0, 8.0) as f32, y_tr + tr_r + 6.0, 7.0],
            dome_h: [h * r.range(0.30, 0.36) as f32, h * r.range(0.25, 0.31) as f32],
            dome_ext: [a * r.range(0.58, 0.66) as f32, b * r.range(0.95, 1.1) as f32],
            dome_cx: a * 0.42,
            dome_cy: -b * r.range(0.05, 0.2) as f32,
            apex_u: r.range(0.16, 0.24) as f32,
            apex_c: [a * 0.38, b * r.range(0.1, 0.2) as f32],
            apex_r: [a * 0.36, b * 0.62],
            lung_hu: r.range(-915.0, -890.0) as f32,
            lung_grad: r.range(10.0, 35.0) as f32,
            lung_tex: r.range(50.0, 80.0) as f32,
            fat_hu: r.range(-110.0, -85.0) as f32,
            muscle_hu: r.range(38.0, 52.0) as f32,
            liver_hu: r.range(52.0, 68.0) as f32,
            tex_seed: r.next_u64() as u32,
            hilum,
        }
    }

    /// Body half axes at depth u (0 apex, 1 lung base): the neck narrows above the apex.
    #[inline]
    fn body_axes(&self, u: f32) -> (f32, f32) {
        if u < -0.08 {
            let s = 1.0 + (u + 0.08) * 4.0;
            (self.a * s.max(0.38), self.b * (1.0 + (u + 0.08) * 2.5).max(0.62))
        } else {
            (self.a, self.b)
        }
    }

    /// Heart ellipsoid test, dilated by `dil` mm.
    #[inline]
    fn in_heart(&self, x: f32, y: f32, z: f32, dil: f32) -> bool {
        let (dx, dy, dz) = (x - self.heart_c[0], y - self.heart_c[1], z - self.heart_c[2]);
        if dz.abs() > self.heart_ax[2] + dil {
            return false;
        }
        let xr = dx * self.heart_rot[0] + dy * self.heart_rot[1];
        let yr = -dx * self.heart_rot[1] + dy * self.heart_rot[0];
        let q = (xr / (self.heart_ax[0] + dil)).powi(2)
            + (yr / (self.heart_ax[1] + dil)).powi(2)
            + (dz / (self.heart_ax[2] + dil)).powi(2);
        q < 1.0
    }

    /// Signed distance to the aorta surface (negative inside).
    #[inline]
    fn aorta_sd(&self, p: [f32; 3]) -> f32 {
        let mut best = f32::MAX;
        for w in self.aorta.windows(2) {
            let (a, ra) = w[0];
            let (b, rb) = w[1];
            let zlo = a[2].min(b[2]) - 20.0;
            let zhi = a[2].max(b[2]) + 20.0;
            if p[2] < zlo || p[2] > zhi {
                continue;
            }
            let (d, t) = seg_dist(p, a, b);
            best = best.min(d - (ra + (rb - ra) * t));
        }
        best
    }

    /// Signed distance to the outer wall of the trachea / main bronchi (negative inside).
    #[inline]
    fn central_airway_sd(&self, p: [f32; 3]) -> f32 {
        let mut best = f32::MAX;
        for &(a, b, r) in &self.central_airways {
            let (d, _) = seg_dist(p, a, b);
            best = best.min(d - r);
        }
        best
    }

    /// z of the diaphragm surface under (x, y); the right dome is higher.
    #[inline]
    pub fn dome_z(&self, x: f32, y: f32) -> f32 {
        let side = if x < 0.0 { 0 } else { 1 };
        let dx = (x.abs() - self.dome_cx) / self.dome_ext[0];
        let dy = (y - self.dome_cy) / self.dome_ext[1];
        let q = 1.0 - dx * dx - dy * dy;
        -self.h + if q > 0.0 { self.dome_h[side] * q.sqrt() } else { 0.0 }
    }

    /// Whether a cavity point above the diaphragm, outside heart/aorta, is lung.
    #[inline]
    fn is_lung(&self, x: f32, y: f32, z: f32, u: f32) -> bool {
        let ax = x.abs();
        // mediastinal half width: narrow anterior/posterior junctions, wider for the great vessels above the heart
        let ant = smooth(0.25 * self.b, -0.1 * self.b, y) * smooth(-0.95 * self.b, -0.6 * self.b, y);
        let upper = smooth(0.5, 0.3, u);
        let hw = 7.0 - 4.5 * ant * (1.0 - upper) + 20.0 * ant * upper;
        if ax < hw {
            return false;
        }
        if u < self.apex_u {
            if u <= 0.0 {
                return false;
            }
            let s = (u / self.apex_u).sqrt();
            let dx = (ax - self.apex_c[0]) / (self.apex_r[0] * s + 1e-3);
            let dy = (y - self.apex_c[1]) / (self.apex_r[1] * s + 1e-3);
            if dx * dx + dy * dy > 1.0 {
                return false;
            }
        }
        let dyv = y - self.y_vb;
        if x * x + dyv * dyv < (self.r_vb + 8.0).powi(2) {
            return false;
        }
        let de = ((x - self.esoph[0]).powi(2) + (y - self.esoph[1]).powi(2)).sqrt();
        if de < self.esoph[2] + 4.0 {
            return false;
        }
        if self.in_heart(x, y, z, 6.0) {
            return false;
        }
        let p = [x, y, z];
        if ax < 60.0 && self.aorta_sd(p) < 5.0 {
            return false;
        }
        if ax < self.hilum[1][0].abs() + 10.0 && z > self.hilum[0][2] - 30.0 {
            if self.central_airway_sd(p) < 3.0 {
                return false;
            }
            for &(a, b, ra, rb) in &self.pulmonary_arteries {
                let (d, t) = seg_dist(p, a, b);
                if d < ra + (rb - ra) * t + 3.0 {
                    return false;
                }
            }
        }
        true
    }

    /// Vertebra at (x, dyv = y - y_vb, z), if the point is bone or canal.
    #[inline]
    fn spine(&self, x: f32, dyv: f32, z: f32) -> Option<(f32, Region)> {
        let rr2 = x * x + dyv * dyv;
        let phase = (z - self.vert_z0).rem_euclid(self.vert_h);
        if rr2 < self.r_vb * self.r_vb {
            if phase < 4.5 {
                return Some((85.0, Region::Wall));
            }
            let rr = rr2.sqrt();
            if rr > self.r_vb - 2.0 || phase < 6.0 || phase > self.vert_h - 1.5 {
                return Some((720.0, Region::Bone));
            }
            let n = noise3(self.tex_seed ^ 0x51, x * 0.4, dyv * 0.4, z * 0.4);
            return Some((200.0 + 90.0 * n, Region::Bone));
        }
        let cy = self.r_vb + 9.0;
        let dc2 = x * x + (dyv - cy) * (dyv - cy);
        if dc2 < 64.0 {
            return Some((22.0, Region::Wall));
        }
        if dc2 < 196.0 && dyv > self.r_vb - 3.0 {
            return Some((620.0, Region::Bone));
        }
        if phase > 6.0 {
            if x.abs() < 4.0 && dyv > cy && dyv < cy + 40.0 - 0.4 * (dyv - cy) {
                return Some((560.0, Region::Bone));
            }
            if (dyv - cy).abs() < 5.0 && x.abs() < 34.0 {
                return Some((560.0, Region::Bone));
            }
        }
        None
    }

    /// Tissue HU and region at a body point.
    pub fn sample(&self, x: f32, y: f32, z: f32) -> (f32, Region) {
        let u = -z / self.h;
        let (ba, bb) = self.body_axes(u);
        let ex = x / ba;
        let ey = y / bb;
        let r2 = ex * ex + ey * ey;
        let bulge = if ey > 0.0 { self.bulge[1] } else { self.bulge[0] };
        let c = if r2 > 1e-9 { ex * ex * ey * ey / (r2 * r2) } else { 0.0 };
        let m = r2.sqrt() / (1.0 + 4.0 * bulge * c);
        if m >= 1.0 {
            return (-1000.0, Region::Air);
        }
        // spine overrides the wall layers
        let dyv = y - self.y_vb;
        if x.abs() < 40.0 && dyv > -self.r_vb - 1.0 && z > -self.h * 1.6 {
            if let Some(s) = self.spine(x, dyv, z) {
                return s;
            }
        }
        let rad = (x * x + y * y).sqrt();
        let d = if m > 1e-3 { rad * (1.0 / m - 1.0) } else { bb };
        if d < 1.8 {
            return (20.0, Region::Wall);
        }
        let cosl = if rad > 1e-3 { (x / rad).abs() } else { 0.0 };
        let sinp = if rad > 1e-3 { y / rad } else { 0.0 };
        let fat = self.fat0 * (0.55 + 0.7 * cosl * cosl) * (1.0 - 0.45 * sinp.max(0.0));
        if d < fat {
            return (self.fat_hu, Region::Wall);
        }
        let apex_extra = if u < 0.2 { (0.2 - u).min(0.3) / 0.2 * 0.2 * self.a } else { 0.0 };
        let musc =
            self.musc0 + self.paraspinal * (-(x / 45.0) * (x / 45.0)).exp() * smooth(0.3, 0.8, sinp) + apex_extra;
        let wall = fat + musc;
        if d < wall {
            if u > -0.03 && u < 0.72 && sinp < -0.85 && d > fat + 0.5 && d < fat + 11.0 {
                let hw = if u < 0.12 { 24.0 } else { 14.0 };
                if x.abs() < hw {
                    let edge = (d - fat).min(fat + 11.0 - d).min(hw - x.abs());
                    return (if edge < 1.8 { 650.0 } else { 240.0 }, Region::Bone);
                }
            }
            return (self.muscle_hu, Region::Wall);
        }
        if d < wall + 9.0 {
            return (self.rib(x, y, z, d - wall), Region::Wall).bone_if_dense();
        }
        if d < wall + 11.0 {
            return (self.muscle_hu - 10.0, Region::Wall);
        }
        // thoracic / abdominal cavity
        if self.in_heart(x, y, z, 0.0) {
            return (38.0, Region::Heart);
        }
        let p = [x, y, z];
        if x.abs() < 60.0 && self.aorta_sd(p) < 0.0 {
            return (42.0, Region::Heart);
        }
        let de2 = (x - self.esoph[0]).powi(2) + (y - self.esoph[1]).powi(2);
        if de2 < self.esoph[2] * self.esoph[2] && z > -self.h * 1.05 {
            return (35.0, Region::Mediastinum);
        }
        let zd = self.dome_z(x, y);
        if z < zd {
            return (self.abdomen(x, y, z, zd), Region::Abdomen);
        }
        if self.is_lung(x, y, z, u) {
            let n = fbm3(self.tex_seed, x * 0.16, y * 0.16, z * 0.16, 2);
            let hu = self.lung_hu + self.lung_grad * (y / self.b) + self.lung_tex * (n - 0.5);
            return (hu, Region::Lung);
        }
        (self.fat_hu + 15.0, Region::Mediastinum)
    }

    /// Rib/cartilage HU in the rib band (depth `db` into the band), or intercostal muscle.
    #[inline]
    fn rib(&self, x: f32, y: f32, z: f32, db: f32) -> f32 {
        let phi = x.atan2(y).abs();
        if phi < 0.3 {
            return self.muscle_hu;
        }
        let zz = z + self.rib_drop * (phi / std::f32::consts::PI);
        let k = ((self.rib_z0 - zz) / self.rib_gap).round();
        if !(0.0..12.0).contains(&k) {
            return self.muscle_hu;
        }
        let dz = zz - (self.rib_z0 - k * self.rib_gap);
        let dr = db - 4.5;
        let q = (dr / 4.5).powi(2) + (dz / 6.5).powi(2);
        if q >= 1.0 {
            return self.muscle_hu;
        }
        let end = 2.45 - if k > 8.0 { (k - 8.0) * 0.4 } else { 0.0 };
        if phi < end {
            if q > 0.42 {
                850.0 + 250.0 * noise3(self.tex_seed ^ 0x77, x * 0.3, y * 0.3, z * 0.3)
            } else {
                260.0
            }
        } else if phi < 2.85 && k < 7.0 {
            115.0
        } else {
            self.muscle_hu
        }
    }

    /// Upper abdomen below the diaphragm: liver on the right, spleen left-posterior, stomach with a gas cap.
    #[inline]
    fn abdomen(&self, x: f32, y: f32, z: f32, zd: f32) -> f32 {
        let liver_edge = 0.05 * self.a + 0.3 * self.a * (-y / self.b).clamp(0.0, 1.0);
        if x < liver_edge {
            return self.liver_hu;
        }
        if x > 0.35 * self.a && y > -0.05 * self.b {
            return 46.0;
        }
        if y < 0.15 * self.b && x > 0.1 * self.a && z > zd - 45.0 {
            return if z > zd - 14.0 && y < -0.1 * self.b { -995.0 } else { 18.0 };
        }
        let n = noise3(self.tex_seed ^ 0x99, x * 0.05, y * 0.05, z * 0.05);
        if n > 0.58 {
            self.fat_hu
        } else {
            30.0
        }
    }

    /// Whether a body point is lung (used for tree growth and lesion placement).
    #[inline]
    pub fn lung_at(&self, p: [f64; 3]) -> bool {
        self.sample(p[0] as f32, p[1] as f32, p[2] as f32).1 == Region::Lung
    }

    /// Pulmonary vessel trees and airways, grown from the hila into the lungs.
    pub fn trees(&self, seed: u64) -> Vec<Tube> {
        let mut out = Vec::new();
        // central airways: trachea and main bronchi (lumen radius = outer minus wall)
        for &(a, b, r) in &self.central_airways {
            let wall = if r > 9.0 { 2.0 } else { 1.5 };
            out.push(Tube { a, b, ra: r - wall, rb: r - wall, kind: TubeKind::Airway { wall } });
        }
        let mut rng = Rng::stream(seed, "trees");
        // pulmonary trunk to the hila (mediastinal part)
        for side in 0..2 {
            let hl = self.hilum[side];
            let sx = if side == 0 { -1.0f64 } else { 1.0 };
            let (a, b, ra, rb) = self.pulmonary_arteries[side];
            out.push(Tube { a, b, ra, rb, kind: TubeKind::Vessel });
            let h = [hl[0] as f64, hl[1] as f64, hl[2] as f64];
            let dirs: [[f64; 3]; 6] = [
                [0.25 * sx, 0.1, 1.0],
                [1.0 * sx, -0.2, 0.35],
                [1.0 * sx, 0.3, -0.3],
                [0.4 * sx, 0.6, -1.0],
                [0.5 * sx, -0.6, -0.7],
                [0.5 * sx, 0.8, 0.2],
            ];
            // arteries and veins: two trees from slightly different roots
            for (tree, off) in [(0, [0.0, -6.0, 4.0]), (1, [0.0, 8.0, -14.0])] {
                let root = [h[0], h[1] + off[1], h[2] + off[2]];
                for d in dirs {
                    let mut budget = 260usize;
                    let dn = norm(d);
                    let r0 = if tree == 0 { 5.2 } else { 4.6 };
                    self.grow(&mut rng, &mut out, root, dn, 30.0, r0, 0, root, &mut budget, TubeKind::Vessel);
                }
            }
            // segmental airways along the main bronchus end
            let broot = {
                let (_, e, _) = self.central_airways[1 + side];
                [e[0] as f64, e[1] as f64, e[2] as f64]
            };
            for d in dirs {
                let mut budget = 40usize;
                self.grow(
                    &mut rng,
                    &mut out,
                    broot,
                    norm(d),
                    24.0,
                    4.2,
                    0,
                    broot,
                    &mut budget,
                    TubeKind::Airway { wall: 1.0 },
                );
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn grow(
        &self,
        rng: &mut Rng,
        out: &mut Vec<Tube>,
        p: [f64; 3],
        dir: [f64; 3],
        len: f64,
        r: f64,
        depth: u32,
        root: [f64; 3],
        budget: &mut usize,
        kind: TubeKind,
    ) {
        let min_r = match kind {
            TubeKind::Vessel => 0.45,
            _ => 0.9,
        };
        if *budget == 0 || r < min_r || depth > 10 {
            return;
        }
        for attempt in 0..6 {
            let d = if attempt == 0 { dir } else { perturb(rng, dir, 0.35 * attempt as f64) };
            let l = len * if attempt > 3 { 0.6 } else { 1.0 };
            let end = add(p, scale(d, l));
            let mid = add(p, scale(d, l * 0.5));
            let ok_start = depth == 0 || self.lung_at(mid);
            if ok_start && self.lung_at(end) {
                *budget -= 1;
                let rb = r * 0.92;
                let kind_here = match kind {
                    TubeKind::Airway { .. } => TubeKind::Airway { wall: (0.18 * r + 0.25) as f32 },
                    k => k,
                };
                out.push(Tube { a: f32s(p), b: f32s(end), ra: r as f32, rb: rb as f32, kind: kind_here });
                let outward = norm(sub(end, root));
                let n_child = if depth < 2 { 3 } else { 2 };
                for c in 0..n_child {
                    if *budget == 0 {
                        return;
                    }
                    let spread = rng.range(0.35, 0.7) * if c == 0 && n_child == 2 { 0.5 } else { 1.0 };
                    let cd = norm(add(perturb(rng, d, spread), scale(outward, 0.35)));
                    let cr = rb * rng.range(0.68, 0.8);
                    let cl = l * rng.range(0.68, 0.85);
                    self.grow(rng, out, end, cd, cl, cr, depth + 1, root, budget, kind);
                }
                return;
            }
        }
    }
}

trait BoneIfDense {
    fn bone_if_dense(self) -> (f32, Region);
}

impl BoneIfDense for (f32, Region) {
    fn bone_if_dense(self) -> (f32, Region) {
        if self.0 > 100.0 {
            (self.0, Region::Bone)
        } else {
            self
        }
    }
}

pub(crate) fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
pub(crate) fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
pub(crate) fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}
pub(crate) fn norm(a: [f64; 3]) -> [f64; 3] {
    let n = (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]).sqrt().max(1e-12);
    scale(a, 1.0 / n)
}
pub(crate) fn f32s(a: [f64; 3]) -> [f32; 3] {
    [a[0] as f32, a[1] as f32, a[2] as f32]
}
/// Random direction near `d`, about `amount` radians away.
pub(crate) fn perturb(rng: &mut Rng, d: [f64; 3], amount: f64) -> [f64; 3] {
    let u = rng.unit3();
    norm(add(d, scale(u, amount.tan().abs().min(3.0))))
}
