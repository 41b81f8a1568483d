//! Registered memory is locked: the process's RLIMIT_MEMLOCK must cover the
//! buffer pool, or registration fails with a bare ENOMEM. This says which
//! limit to raise instead.

/// Checks that `bytes` more can be locked; the error names the fix.
pub fn check(bytes: u64) -> Result<(), String> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(format!("cannot read the memory-lock limit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= bytes {
        return Ok(());
    }
    Err(format!(
        "RDMA buffers need {bytes} bytes of locked memory but the limit is {} bytes: run `ulimit -l unlimited` (or at least {} KiB) before tandemd, or set LimitMEMLOCK=infinity in its systemd unit",
        limit.rlim_cur,
        bytes.div_ceil(1024)
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_limit_below_the_pool_names_the_fix() {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct passed.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) }, 0);
        assert!(super::check(0).is_ok());
        if limit.rlim_cur != libc::RLIM_INFINITY {
            let error = super::check(limit.rlim_cur + 1).unwrap_err();
            assert!(error.contains("ulimit -l") && error.contains("LimitMEMLOCK"), "{error}");
        }
    }
}
