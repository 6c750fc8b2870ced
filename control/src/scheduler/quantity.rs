//! Kubernetes resource quantities ("100m", "0.5", "1.5Gi", "2e3") as the scheduler
//! needs them: cpu in millicores and everything else in whole units, rounded up the way
//! `Quantity.MilliValue()` and `Quantity.Value()` round. Parsed with integer arithmetic so
//! "100m" is exactly 100 millicores, never 99.999.

/// `value = ±mantissa × 10^exp10 × 2^exp2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    negative: bool,
    mantissa: u128,
    exp10: i32,
    exp2: u32,
}

/// Millicores (or milli-units) of a quantity, rounded up; `None` when it does not parse.
pub fn parse_milli(s: &str) -> Option<i64> {
    parse(s).map(|p| scaled_ceil(p, 3))
}

/// Whole units (bytes, pods) of a quantity, rounded up; `None` when it does not parse.
pub fn parse_units(s: &str) -> Option<i64> {
    parse(s).map(|p| scaled_ceil(p, 0))
}

/// Like [`parse_milli`], but a malformed quantity counts as 0 (and is logged) so one
/// bad object cannot stop scheduling.
pub fn milli_or_zero(s: &str, what: &str) -> i64 {
    parse_milli(s).unwrap_or_else(|| {
        tracing::warn!("ignoring malformed quantity {s:?} for {what}");
        0
    })
}

/// Like [`parse_units`], but a malformed quantity counts as 0 (and is logged).
pub fn units_or_zero(s: &str, what: &str) -> i64 {
    parse_units(s).unwrap_or_else(|| {
        tracing::warn!("ignoring malformed quantity {s:?} for {what}");
        0
    })
}

/// `<sign><digits>[.<digits>]<suffix>` where the suffix is a binary SI suffix (Ki..Ei),
/// a decimal SI suffix (n u m "" k M G T P E) or a decimal exponent (e3, E-2).
fn parse(s: &str) -> Option<Parsed> {
    let s = s.trim();
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return None;
    }
    let mut mantissa: u128 = 0;
    for c in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(c - b'0'))?;
    }
    let frac_digits = i32::try_from(frac_part.len()).ok()?;
    let (exp10, exp2) = suffix_exponents(suffix)?;
    Some(Parsed {
        negative,
        mantissa,
        exp10: exp10.checked_sub(frac_digits)?,
        exp2,
    })
}

fn suffix_exponents(suffix: &str) -> Option<(i32, u32)> {
    let binary = |n: u32| Some((0, n));
    let decimal = |n: i32| Some((n, 0));
    match suffix {
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "" => decimal(0),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        _ => {
            // A decimal exponent: "e3", "E-2". ("E" alone is exa, handled above.)
            let digits = suffix.strip_prefix(['e', 'E'])?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            decimal(digits.parse::<i32>().ok()?)
        }
    }
}

/// `ceil(value × 10^scale)`, saturating at the i64 range (an absurdly large request
/// should not fit anywhere rather than wrap around).
fn scaled_ceil(p: Parsed, scale: i32) -> i64 {
    if p.mantissa == 0 {
        return 0;
    }
    let saturated = if p.negative { i64::MIN } else { i64::MAX };
    let Some(base) = 1u128
        .checked_shl(p.exp2)
        .and_then(|f| p.mantissa.checked_mul(f))
    else {
        return saturated;
    };
    let exp = p.exp10.saturating_add(scale);
    let magnitude: u128 = if exp >= 0 {
        match 10u128
            .checked_pow(exp.unsigned_abs())
            .and_then(|f| base.checked_mul(f))
        {
            Some(v) => v,
            None => return saturated,
        }
    } else {
        match 10u128.checked_pow(exp.unsigned_abs()) {
            // Rounding up for positive values, towards zero for negative ones (ceil).
            Some(d) if p.negative => base / d,
            Some(d) => base.div_ceil(d),
            // Smaller than any representable unit.
            None if p.negative => 0,
            None => 1,
        }
    };
    match i64::try_from(magnitude) {
        Ok(v) if p.negative => -v,
        Ok(v) => v,
        Err(_) => saturated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_in_millicores() {
        assert_eq!(parse_milli("100m"), Some(100));
        assert_eq!(parse_milli("0.5"), Some(500));
        assert_eq!(parse_milli(".5"), Some(500));
        assert_eq!(parse_milli("2"), Some(2000));
        assert_eq!(parse_milli("1.5"), Some(1500));
        assert_eq!(parse_milli("250m"), Some(250));
        // Below a millicore rounds up, as MilliValue does.
        assert_eq!(parse_milli("1u"), Some(1));
        assert_eq!(parse_milli("500n"), Some(1));
        assert_eq!(parse_milli("0"), Some(0));
        assert_eq!(parse_milli("1e-3"), Some(1));
    }

    #[test]
    fn memory_in_bytes() {
        assert_eq!(parse_units("128974848"), Some(128_974_848));
        assert_eq!(parse_units("1Ki"), Some(1024));
        assert_eq!(parse_units("200Mi"), Some(200 * 1024 * 1024));
        assert_eq!(parse_units("1.5Gi"), Some(1_610_612_736));
        assert_eq!(parse_units("2Ti"), Some(2 << 40));
        assert_eq!(parse_units("1k"), Some(1000));
        assert_eq!(parse_units("129M"), Some(129_000_000));
        assert_eq!(parse_units("1G"), Some(1_000_000_000));
        assert_eq!(parse_units("3T"), Some(3_000_000_000_000));
        assert_eq!(parse_units("129e6"), Some(129_000_000));
        assert_eq!(parse_units("1E3"), Some(1000));
        assert_eq!(parse_units("1E"), Some(1_000_000_000_000_000_000));
        assert_eq!(parse_units("110"), Some(110));
        assert_eq!(parse_units("+5"), Some(5));
        assert_eq!(parse_units("-5"), Some(-5));
    }

    #[test]
    fn malformed_or_huge() {
        for bad in ["", "abc", "1.2.3", "12Xi", "1e", "e3", "-", "1 Gi", "1e3.5"] {
            assert_eq!(parse_units(bad), None, "{bad:?}");
        }
        assert_eq!(units_or_zero("nope", "test"), 0);
        assert_eq!(milli_or_zero("12q", "test"), 0);
        // Saturates instead of overflowing.
        assert_eq!(parse_units("100Ei"), Some(i64::MAX));
        assert_eq!(parse_units("1e400"), Some(i64::MAX));
        assert_eq!(parse_milli("1e-400"), Some(1));
        assert_eq!(
            parse_units("99999999999999999999999999999999999999999999"),
            None
        );
    }
}
