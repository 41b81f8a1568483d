//! Byte sizes as operators write them: `8GiB`, `128MiB`, `512k`, `4096`.

/// Splits `12GiB` (surrounding blanks ignored) into its number and what
/// follows it, or `None` when it does not start with a number.
pub fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    Some((digits.parse().ok()?, unit))
}

/// Parses a size: a number with an optional binary unit (K, M, G, T; with or
/// without `i`/`iB`/`B`; case-insensitive). Units are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) =
        number_and_unit(text).ok_or_else(|| format!("{text:?} is not a size; write it like 8GiB, 128MiB or 4096"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}; use K, M, G or T (powers of 1024)")),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("size {text:?} does not fit in 64 bits"))
}

/// Parses a duration as operators write it: `90` or `90s`, `30m`, `2h`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) =
        number_and_unit(text).ok_or_else(|| format!("{text:?} is not a duration; write it like 90s, 30m or 2h"))?;
    let seconds = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}; use s, m or h")),
    };
    Ok(std::time::Duration::from_secs(number * seconds))
}

/// Formats bytes with the largest binary unit that keeps one decimal.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_with_units_and_refuse_others() {
        assert_eq!(super::parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(super::parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(super::parse_duration("2h").unwrap().as_secs(), 7200);
        assert!(super::parse_duration("3d").unwrap_err().contains("use s, m or h"));
        assert!(super::parse_duration("soon").unwrap_err().contains("90s, 30m or 2h"));
    }

    use super::*;

    #[test]
    fn parses_operator_sizes() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("8 parsecs").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("GiB").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999T").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(8 << 30), "8.0 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
