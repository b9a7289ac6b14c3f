#!/usr/bin/env bash
# Build esam_ros's messages with the ROS 2 wheels inside a venv and install them into it, so that
# `from esam_ros.msg import Entity` works next to the (pip-installed, editable) node code.
# Usage: scripts/build_msgs.sh VENV_DIR   (safe to re-run)
set -euo pipefail
venv=$(cd "${1:?usage: build_msgs.sh VENV_DIR}" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
py="$venv/bin/python"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pyinc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$("$py" -c 'import numpy; print(numpy.get_include())')

# The wheels' CMake exports name the include directories of the machine that built them
# (/opt/python/cp311-cp311/...); CMake refuses targets whose include paths do not exist, so point
# them at this venv's Python headers and numpy.
{ grep -rlF /opt/python/cp311-cp311 "$venv/share" --include="*.cmake" 2>/dev/null || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g" \
         -e "s#/opt/python/cp311-cp311/include/python3.11#$pyinc#g" "$f"
done

export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
build="$root/build/msgs"
mkdir -p "$build"
cmake -S "$root" -B "$build" -DESAM_MSGS_ONLY=ON -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_PREFIX="$venv" -DCMAKE_INSTALL_RPATH="$venv/lib" \
  -DPython3_EXECUTABLE="$py" -DPYTHON_EXECUTABLE="$py" >"$build.log" 2>&1 \
  || { cat "$build.log"; exit 1; }
cmake --build "$build" -j 2 >>"$build.log" 2>&1 || { tail -50 "$build.log"; exit 1; }
cmake --install "$build" >>"$build.log" 2>&1 || { tail -50 "$build.log"; exit 1; }

# rosidl installed a stub `esam_ros` package (empty __init__, egg-info) into site-packages. It
# would shadow the node code, so move the generated modules into the source package (git-ignored:
# esam_ros/msg/ and the typesupport extensions) and drop the stub.
gen="$site/esam_ros"
rm -rf "$root/esam_ros/msg" "$root"/esam_ros/esam_ros_s__*.so
mv "$gen/msg" "$root/esam_ros/msg"
mv "$gen"/esam_ros_s__*.so "$root/esam_ros/"
rm -rf "$gen" "$site"/esam_ros-*.egg-info
echo "messages installed into $venv (log: $build.log)"
