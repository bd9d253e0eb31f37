//! The `keyrotate` binary: everything happens in the library; see `keyrotate::main`.

fn main() -> std::process::ExitCode {
    // The same binary watches each hook step (see `backend::watcher`).
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(keyrotate::backend::watcher::ARG)) {
        return keyrotate::backend::watcher::main(args.collect());
    }
    keyrotate::main()
}
