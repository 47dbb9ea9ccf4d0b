//! `ktls-setup enable`: load the `tls` module now and at boot.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ktls_setup::probe::{ConfigState, KernelInfo};

/// Where systemd-modules-load reads module names at boot.
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/tls.conf";
const MODULES_LOAD_CONTENT: &str =
    "# kernel TLS (kTLS) for mcp-tls-gateway; written by `ktls-setup enable`\ntls\n";
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `enable` will do on this host.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// The ULP already works and the module needs no loading at boot
    /// (built in).
    Nothing,
    /// Run modprobe (unless `already_loaded`), verify, persist.
    Load {
        modprobe: PathBuf,
        already_loaded: bool,
    },
}

/// Decides from the kernel facts; errors say why it cannot work.
pub fn plan(k: &KernelInfo, ulp: &Result<(), String>, modprobe: Option<PathBuf>) -> Result<Plan> {
    if k.config_tls == ConfigState::Builtin {
        return match ulp {
            Ok(()) => Ok(Plan::Nothing),
            Err(e) => bail!("CONFIG_TLS=y (built in), so there is no module to load, yet: {e}"),
        };
    }
    if k.config_tls == ConfigState::Unset {
        bail!(
            "kernel {} is built without kernel TLS (CONFIG_TLS is not set{}): there is no tls module \
             to load{}; boot a kernel with CONFIG_TLS=y or CONFIG_TLS=m",
            k.release,
            k.config_source.as_deref().map(|s| format!(", per {s}")).unwrap_or_default(),
            k.modules_unsupported().map(|w| format!(" (and {w})")).unwrap_or_default()
        );
    }
    if let Some(why) = k.modules_unsupported() {
        if ulp.is_ok() {
            // Works anyway (built in, config unreadable): nothing to load.
            return Ok(Plan::Nothing);
        }
        bail!("cannot load the tls module: {why}; kernel TLS needs a kernel with CONFIG_TLS=y, or CONFIG_TLS=m with its modules installed");
    }
    let Some(modprobe) = modprobe else {
        if ulp.is_ok() && k.tls_module_loaded {
            // Loaded already; persist without modprobe.
            return Ok(Plan::Load {
                modprobe: PathBuf::from("modprobe"),
                already_loaded: true,
            });
        }
        bail!("modprobe not found (looked in PATH, /sbin, /usr/sbin): install kmod (apt-get install kmod)");
    };
    Ok(Plan::Load {
        modprobe,
        already_loaded: ulp.is_ok() && k.tls_module_loaded,
    })
}

/// `modprobe` in PATH or the usual sbin directories.
pub fn find_modprobe() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("modprobe"))
        .find(|p| p.is_file())
}

/// Whether the modules-load file already names `tls`.
pub fn names_tls(content: &str) -> bool {
    content
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .any(|l| l == "tls")
}

/// Writes the modules-load file unless it already loads `tls`. Returns
/// whether it wrote.
pub fn persist(path: &Path) -> Result<bool> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        if names_tls(&existing) {
            return Ok(false);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, MODULES_LOAD_CONTENT)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(true)
}

fn run_modprobe(modprobe: &Path) -> Result<()> {
    let mut child = Command::new(modprobe)
        .arg("tls")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", modprobe.display()))?;
    let deadline = Instant::now() + MODPROBE_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} tls did not finish within {MODPROBE_TIMEOUT:?}",
                modprobe.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.by_ref().take(64 * 1024).read_to_string(&mut err);
    }
    if !status.success() {
        bail!(
            "{} tls failed ({status}): {}",
            modprobe.display(),
            err.trim()
        );
    }
    Ok(())
}

/// Runs the command; prints what it does.
pub fn run(dry_run: bool, modules_load_file: &Path) -> Result<()> {
    let k = KernelInfo::read();
    let ulp = ktls_setup::ulp_available();
    let plan = plan(&k, &ulp, find_modprobe())?;
    match plan {
        Plan::Nothing => {
            println!(
                "kernel TLS is built into kernel {}: nothing to load or persist",
                k.release
            );
            Ok(())
        }
        Plan::Load {
            modprobe,
            already_loaded,
        } => {
            let have = std::fs::read_to_string(modules_load_file)
                .map(|s| names_tls(&s))
                .unwrap_or(false);
            if dry_run {
                if already_loaded {
                    println!("would skip modprobe: the tls module is loaded and the TLS ULP works");
                } else {
                    println!("would run: {} tls", modprobe.display());
                    println!("would check: setsockopt(TCP_ULP, \"tls\") on a loopback TCP pair");
                }
                if have {
                    println!(
                        "would leave {}: it already loads tls",
                        modules_load_file.display()
                    );
                } else {
                    println!(
                        "would write {} (tls loaded at boot)",
                        modules_load_file.display()
                    );
                }
                return Ok(());
            }
            if already_loaded {
                println!("tls module already loaded; TLS ULP works");
            } else {
                run_modprobe(&modprobe)?;
                println!("ran {} tls", modprobe.display());
                ktls_setup::ulp_available()
                    .map_err(|e| anyhow::anyhow!("modprobe tls succeeded but {e}"))?;
                println!("TLS ULP works");
            }
            if persist(modules_load_file)? {
                println!("wrote {}", modules_load_file.display());
            } else {
                println!("{} already loads tls", modules_load_file.display());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(tls: ConfigState, dir: bool, loaded: bool) -> KernelInfo {
        KernelInfo {
            release: "6.1.0-test".into(),
            config_source: Some("/boot/config-6.1.0-test".into()),
            config_tls: tls,
            config_modules: ConfigState::Builtin,
            modules_dir: "/lib/modules/6.1.0-test".into(),
            modules_dir_exists: dir,
            tls_module_loaded: loaded,
            tls_stat: loaded,
        }
    }

    #[test]
    fn plans() {
        let no: Result<(), String> = Err("ENOENT".into());
        let mp = Some(PathBuf::from("/usr/sbin/modprobe"));
        let e = plan(&k(ConfigState::Unset, true, false), &no, mp.clone()).unwrap_err();
        assert!(e.to_string().contains("CONFIG_TLS is not set"), "{e}");
        let e = plan(&k(ConfigState::Module, false, false), &no, mp.clone()).unwrap_err();
        assert!(
            e.to_string()
                .contains("/lib/modules/6.1.0-test does not exist"),
            "{e}"
        );
        let e = plan(&k(ConfigState::Module, true, false), &no, None).unwrap_err();
        assert!(e.to_string().contains("modprobe not found"), "{e}");
        assert_eq!(
            plan(&k(ConfigState::Module, true, false), &no, mp.clone()).unwrap(),
            Plan::Load {
                modprobe: PathBuf::from("/usr/sbin/modprobe"),
                already_loaded: false
            }
        );
        assert_eq!(
            plan(&k(ConfigState::Builtin, false, false), &Ok(()), None).unwrap(),
            Plan::Nothing
        );
    }

    #[test]
    fn persist_is_idempotent() {
        let dir = std::env::temp_dir().join(format!("ktls-setup-test-{}", std::process::id()));
        let f = dir.join("modules-load.d/tls.conf");
        assert!(persist(&f).unwrap());
        assert!(!persist(&f).unwrap());
        assert!(names_tls(&std::fs::read_to_string(&f).unwrap()));
        std::fs::write(&f, "# tls\nfoo\n").unwrap();
        assert!(!names_tls("# tls\nfoo\n"));
        assert!(persist(&f).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
