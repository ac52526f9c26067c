{{/*
Names and labels. The release name is the run name (unique per submission, chosen by the launcher).
Selector labels (name + instance) are kept apart from the full set so that anything selecting pods
never depends on labels that change between chart versions.
*/}}

{{/*
The run name, checked: the training-operator names pods and Services `<run>-worker-<i>`, JobSet names
pod hostnames `<run>-node-0-<i>` (DNS-1035, <= 63).
*/}}
{{- define "userloop.runName" -}}
{{- $name := .Release.Name -}}
{{- $longest := printf "%s-worker-%d" $name (max 0 (sub (int .Values.nodes) 2)) -}}
{{- if eq .Values.api "trainjob" -}}
{{- $longest = printf "%s-node-0-%d" $name (sub (int .Values.nodes) 1) -}}
{{- end -}}
{{- if gt (len $longest) 63 -}}
{{- fail (printf "run name %q is too long: pod name %q has %d characters, the limit is 63; shorten `name` in the run config" $name $longest (len $longest)) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "run name %q must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "userloop.configMapName" -}}
{{- printf "%s-config" (include "userloop.runName" .) -}}
{{- end -}}

{{- define "userloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a run. */}}
{{- define "userloop.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ include "userloop.runName" . }}
{{- end -}}

{{/*
Standard labels of a run's objects. User labels from the config are merged in but cannot override these
(`merge` keeps the first dict's keys): `launcher list` and `status` select runs by them.
*/}}
{{- define "userloop.labels" -}}
{{- $std := dict
  "helm.sh/chart" (include "userloop.chart" .)
  "app.kubernetes.io/name" .Chart.Name
  "app.kubernetes.io/instance" (include "userloop.runName" .)
  "app.kubernetes.io/version" .Chart.AppVersion
  "app.kubernetes.io/component" "training-run"
  "app.kubernetes.io/part-of" "userloop"
  "app.kubernetes.io/managed-by" .Release.Service
  "userloop.dev/run" (include "userloop.runName" .)
  "userloop.dev/config" .Values.configName -}}
{{- toYaml (merge $std (deepCopy .Values.labels)) -}}
{{- end -}}

{{/* Labels of objects shared by every run (PVC, ServiceAccount): no run name, so no run claims them. */}}
{{- define "userloop.sharedLabels" -}}
{{- $std := dict
  "helm.sh/chart" (include "userloop.chart" .)
  "app.kubernetes.io/name" .Chart.Name
  "app.kubernetes.io/part-of" "userloop"
  "app.kubernetes.io/managed-by" .Release.Service -}}
{{- toYaml (merge $std (deepCopy .Values.labels)) -}}
{{- end -}}

{{/*
The trainer container's name: the training-operator's webhook requires `pytorch`; Kubeflow Trainer's
torch plugin injects PET_* only into, and applies TrainJob.spec.trainer only to, the container `node`.
*/}}
{{- define "userloop.trainerContainer" -}}
{{- ternary "node" "pytorch" (eq .Values.api "trainjob") -}}
{{- end -}}

{{/* GPUs of one pod, trainer plus sidecar. */}}
{{- define "userloop.podGpus" -}}
{{- $sidecar := add (ternary (int .Values.sglang.gpus) 0 .Values.sglang.enabled) (ternary (int .Values.vllm.gpus) 0 .Values.vllm.enabled) -}}
{{- add (int .Values.trainer.gpus) $sidecar -}}
{{- end -}}

{{/*
Restrictive container security context; both images run as the unprivileged user of docker/. Called with
a dict: `readOnlyRootFilesystem` (bool) is the one setting the two containers differ in (see _pod.tpl).
The pod sets seccomp too; repeating it here keeps each container safe if the pod context is overridden.
*/}}
{{- define "userloop.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
privileged: false
readOnlyRootFilesystem: {{ .readOnlyRootFilesystem }}
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "userloop.resources" -}}
{{- $r := dict "cpu" (toString .cpu) "memory" (toString .memory) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $r "nvidia.com/gpu" (toString (int .gpus)) -}}
{{- end -}}
limits:
  {{- toYaml $r | nindent 2 }}
requests:
  {{- toYaml $r | nindent 2 }}
{{- end -}}
