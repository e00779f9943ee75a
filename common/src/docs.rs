//! Shell completions and man pages generated from the clap definitions (for the packages).
use std::path::Path;

/// Write bash/zsh/fish completions and man pages (one per subcommand) for `cmd` into
/// `out/completions/` and `out/man/`.
pub fn generate(mut cmd: clap::Command, out: &Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let name = cmd.get_name().to_string();
    let comp = out.join("completions");
    std::fs::create_dir_all(&comp)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &comp)?;
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    cmd.build();
    write_man(&cmd, &name, &man)
}

fn write_man(cmd: &clap::Command, full_name: &str, dir: &Path) -> std::io::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let page = cmd.clone().name(full_name.to_string());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(dir.join(format!("{full_name}.1")), buf)?;
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_man(sub, &format!("{full_name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
