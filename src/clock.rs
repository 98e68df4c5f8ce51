//! clock — wall-clock time and its one text form: RFC 3339 UTC with milliseconds (`2027-01-01T00:00:00.123Z`).
//!
//! Owns: the current time as unix milliseconds ([`now_ms`], the store's one time unit), formatting unix
//! milliseconds as RFC 3339 ([`rfc3339`], [`now_rfc3339`]) and reading such a timestamp back ([`parse_rfc3339_ms`]),
//! and a day number as a DICOM date ([`dicom_date`]), all through `jiff` (UTC only: no time zone database is
//! read).
//! Hands on: `i64` milliseconds and `String`s; results, the dashboard, the outbox's DICOM dates and the reports
//! store and compare these.
//! Never: imports anything else of the crate, reads local time zones, or changes the text form (stored results
//! and DICOM Content Date/Time are made from it: always 3 fraction digits and `Z`).

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Current time as unix-epoch milliseconds (0 if the clock reads before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Current UTC time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339(now_ms())
}

/// Unix milliseconds → RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ` (exactly 3 fraction digits). Instants outside
/// jiff's range (-009999-01-02T01:59:59Z ..= 9999-12-30T22:00:00.999999999Z; no clock reads them) are clamped to
/// its ends — the only text that differs from the hand-written formatter this replaced.
pub fn rfc3339(ms: i64) -> String {
    let ts = Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 { Timestamp::MIN } else { Timestamp::MAX });
    format!("{ts:.3}")
}

/// Days since 1970-01-01 → DICOM DA (`YYYYMMDD`, proleptic Gregorian, UTC). Days outside jiff's range are
/// clamped to its ends, as in [`rfc3339`].
pub fn dicom_date(days: i64) -> String {
    let ts = Timestamp::from_second(days.saturating_mul(86_400)).unwrap_or(if days < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    ts.strftime("%Y%m%d").to_string()
}

/// Unix ms of an RFC 3339 timestamp as [`rfc3339`] writes them (any offset or fraction precision is honoured;
/// sub-millisecond digits are dropped). A timestamp without an offset (`YYYY-MM-DDTHH:MM:SS[.fff]`) is read as
/// UTC, as the hand-written parser this replaced did. `None` for anything else.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let ts = match s.parse::<Timestamp>() {
        Ok(ts) => ts,
        Err(_) => TimeZone::UTC.to_timestamp(s.parse::<DateTime>().ok()?).ok()?,
    };
    Some(ts.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_798_761_600_123), "2027-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_456), "2026-11-18T11:06:40.456Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        // jiff's last instant (it keeps room for any offset up to ±25:59:59); later ones are clamped to it.
        assert_eq!(rfc3339(253_402_207_200_999), "9999-12-30T22:00:00.999Z");
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-30T22:00:00.999Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-30T22:00:00.999Z");
        assert_eq!(dicom_date(i64::MAX), "99991230");
    }

    /// The output of the hand-written civil-from-days formatter this module replaced, for every day boundary
    /// ±1 ms over 1969..2101 and a walk of odd offsets: byte-identical.
    #[test]
    fn same_text_as_the_civil_from_days_formatter() {
        fn hinnant(ms: i64) -> String {
            let secs = ms.div_euclid(1000);
            let milli = ms.rem_euclid(1000);
            let days = secs.div_euclid(86_400);
            let sod = secs.rem_euclid(86_400);
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z.rem_euclid(146_097);
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let y = yoe + era * 400;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            let y = if m <= 2 { y + 1 } else { y };
            format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
        }
        let day = 86_400_000i64;
        let mut checked = 0;
        for d in -365..(131 * 366) {
            for off in [-1, 0, 1, 12_345_678] {
                let ms = d * day + off;
                assert_eq!(rfc3339(ms), hinnant(ms), "ms = {ms}");
                assert_eq!(parse_rfc3339_ms(&rfc3339(ms)), Some(ms), "ms = {ms}");
                checked += 1;
            }
        }
        let mut ms = 0i64;
        while ms < 4_102_444_800_000 {
            assert_eq!(rfc3339(ms), hinnant(ms));
            ms += 7_777_777_777;
        }
        assert!(checked > 190_000);
    }

    /// The phantom's hand-written days → YYYYMMDD formatter this replaced: byte-identical over 1900..2200.
    #[test]
    fn dicom_dates_as_before() {
        fn hinnant(days: i64) -> String {
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
            format!("{y:04}{m:02}{d:02}")
        }
        assert_eq!(dicom_date(0), "19700101");
        assert_eq!(dicom_date(11_016), "20000229");
        assert_eq!(dicom_date(-1), "19691231");
        for days in -25_567..84_000 {
            assert_eq!(dicom_date(days), hinnant(days), "days = {days}");
        }
    }

    #[test]
    fn parses_what_it_writes_and_utc_without_offset() {
        for ms in [0i64, 951_782_400_000, 1_798_761_600_123, 1_795_000_000_456] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339_ms("2026-01-01T00:00:01.000Z"), Some(1_767_225_601_000));
        assert_eq!(parse_rfc3339_ms("2026-01-01T00:00:01"), Some(1_767_225_601_000));
        assert_eq!(parse_rfc3339_ms("2026-01-01T01:00:01.000+01:00"), Some(1_767_225_601_000));
        assert_eq!(parse_rfc3339_ms("2026-01-01T00:00:01.5Z"), Some(1_767_225_601_500));
        assert_eq!(parse_rfc3339_ms(""), None);
        assert_eq!(parse_rfc3339_ms("not a time"), None);
        assert_eq!(parse_rfc3339_ms("2026-13-01T00:00:00.000Z"), None);
    }
}
