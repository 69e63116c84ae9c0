#!/bin/sh
# Entrypoint of the ioc image.
#
# For every variable IOC_<NAME>_FILE=<path> (typically a Docker/Compose secret mounted under
# /run/secrets), export IOC_<NAME> with the file's content (trailing newlines stripped) and
# drop the *_FILE variable, so the settings class only ever sees IOC_<NAME>. Setting both
# IOC_<NAME> and IOC_<NAME>_FILE is an error, as is an unreadable file. Then exec the command.
set -eu

for file_var in $(env | sed -n 's/^\(IOC_[A-Za-z0-9_]*_FILE\)=.*/\1/p'); do
    var=${file_var%_FILE}
    eval "path=\${$file_var}"
    eval "already=\${$var+set}"
    if [ "$already" = "set" ]; then
        echo "ioc-entrypoint: both $var and $file_var are set; set only one" >&2
        exit 64
    fi
    if [ ! -r "$path" ]; then
        echo "ioc-entrypoint: $file_var points to '$path', which is not a readable file" >&2
        exit 66
    fi
    value=$(cat "$path")
    export "$var=$value"
    unset "$file_var"
done

if [ "$#" -eq 0 ]; then
    set -- ioc api
fi
exec "$@"
