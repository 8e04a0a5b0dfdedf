//! The `drv-thru` command; everything happens in [`drv_thru::cli`].

fn main() -> std::process::ExitCode {
    drv_thru::cli::main()
}
