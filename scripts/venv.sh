# shellcheck shell=bash
# ensure_venv: create .venv in the current folder when missing. Debian's system python needs
# python3-venv for ensurepip; it is installed with apt when `python3 -m venv` fails.
ensure_venv() {
    [[ -x .venv/bin/python ]] && return 0
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        echo "python3 -m venv failed; installing python3-venv with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv
    fi
}
