//! The `keyrotate` binary: everything happens in the library; see `keyrotate::main`.

fn main() -> std::process::ExitCode {
    keyrotate::main()
}
