//! The `keyrotate` binary: everything happens in the library; see `keyrotate::main`.

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    // The same binary watches each hook step (see `backend::watcher`).
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(keyrotate::backend::watcher::ARG)) {
        return keyrotate::backend::watcher::main(args.collect());
    }
    keyrotate::main()
}

/// glibc gives each new thread that allocates its own malloc arena: a 64 MiB
/// reservation (mapped at twice that and trimmed) whose first pages are then faulted
/// in, several system calls and page faults for a watchdog thread that allocates a
/// few bytes. One short-lived process with little concurrent allocation gains nothing
/// from more arenas, so every thread shares the main one.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it is called before any
    // thread exists, and M_ARENA_MAX with a positive value is a documented setting.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
