{{/*
Chart name (app.kubernetes.io/name).
*/}}
{{- define "k2serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Truncated to 40 characters (not 63) to leave room for the
suffixes added to it: ours (`-test-request`, 13) and KubeRay's (`-head-svc`, `-decode-worker-xxxxx`, 20),
which must still be valid 63-character DNS labels.
*/}}
{{- define "k2serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
helm.sh/chart label value.
*/}}
{{- define "k2serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the immutable subset. Call with (dict "ctx" $ "component" "router").
*/}}
{{- define "k2serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k2serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/*
Standard labels of every resource. Call with (dict "ctx" $ "component" "router"); component may be "".
*/}}
{{- define "k2serve.labels" -}}
helm.sh/chart: {{ include "k2serve.chart" .ctx }}
{{ include "k2serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: k2serve
{{- end }}

{{/*
ServiceAccount of every pod.
*/}}
{{- define "k2serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "k2serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The k2serve image (head, worker groups, router).
*/}}
{{- define "k2serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
Secret with the router's API keys: the given existing one, or the one the chart creates.
*/}}
{{- define "k2serve.apiKeySecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "k2serve.fullname" .)) }}
{{- end }}

{{/*
Secret with the Ray auth token: the given existing one, or the one the chart creates.
*/}}
{{- define "k2serve.rayTokenSecretName" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-token" (include "k2serve.fullname" .)) }}
{{- end }}

{{- define "k2serve.clusterTokenSecretName" -}}
{{- .Values.clusterToken.existingSecret | default (printf "%s-cluster-token" (include "k2serve.fullname" .)) }}
{{- end }}

{{/*
K2SERVE_CLUSTER_TOKEN: the head and the routers (the ranks get it from the controller).
*/}}
{{- define "k2serve.clusterTokenEnv" -}}
- name: K2SERVE_CLUSTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "k2serve.clusterTokenSecretName" . }}
      key: {{ .Values.clusterToken.secretKey }}
{{- end }}

{{/*
Names derived from the full name.
*/}}
{{- define "k2serve.routerName" -}}
{{- printf "%s-router" (include "k2serve.fullname" .) }}
{{- end }}

{{/* KubeRay names the head Service of RayCluster <name> "<name>-head-svc". */}}
{{- define "k2serve.headServiceName" -}}
{{- printf "%s-head-svc" (include "k2serve.fullname" .) }}
{{- end }}

{{/* HOST:PORT of the controller's registry (on the Ray head), as the router dials it. */}}
{{- define "k2serve.registryAddress" -}}
{{- printf "%s.%s.svc:%d" (include "k2serve.headServiceName" .) .Release.Namespace (int .Values.cluster.registryPort) }}
{{- end }}

{{/* HOST:PORT of the Ray GCS (on the Ray head), as the workers' `ray start --address` dials it. */}}
{{- define "k2serve.gcsAddress" -}}
{{- printf "%s.%s.svc:%d" (include "k2serve.headServiceName" .) .Release.Namespace (int .Values.ray.gcsPort) }}
{{- end }}

{{/* The model folder inside every pod (the model volume is mounted read-only at /models). */}}
{{- define "k2serve.modelPath" -}}
{{- printf "/models/%s" .Values.model.name }}
{{- end }}

{{- define "k2serve.servedModelName" -}}
{{- .Values.model.servedModelName | default .Values.model.name }}
{{- end }}

{{/* The smallest max_model_len of the two pools: the router's context limit. */}}
{{- define "k2serve.maxModelLen" -}}
{{- min (int .Values.prefill.pool.maxModelLen) (int .Values.decode.pool.maxModelLen) }}
{{- end }}

{{/*
The model volume: an existing PVC, else a hostPath.
*/}}
{{- define "k2serve.modelVolume" -}}
- name: model
{{- if .Values.model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    {{- with .Values.model.hostPathType }}
    type: {{ . }}
    {{- end }}
{{- else }}
{{- fail "model: set model.existingClaim (a PVC holding the model) or model.hostPath" }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container (head and workers): the pod IP and Ray token authentication.
*/}}
{{- define "k2serve.rayEnv" -}}
- name: K2SERVE_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: K2SERVE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: RAY_AUTH_MODE
  value: {{ ternary "token" "disabled" .Values.rayAuth.enabled }}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "k2serve.rayTokenSecretName" . }}
      key: {{ .Values.rayAuth.secretKey }}
{{- end }}
{{- end }}

{{/*
`ray start` flags from a map: `--key='value'`, or a bare `--key` for an empty value.
*/}}
{{- define "k2serve.rayFlags" -}}
{{- range $key, $value := . }} --{{ $key }}{{ if ne (toString $value) "" }}={{ toString $value | squote }}{{ end }}{{ end }}
{{- end }}

{{/*
A pool's section of the cluster YAML (pools.<name>), from <pool>.pool in camelCase.
*/}}
{{- define "k2serve.poolConfig" -}}
groups: {{ .groups }}
ep_size: {{ .epSize }}
gpus_per_rank: {{ .gpusPerRank }}
cpus_per_rank: {{ .cpusPerRank }}
{{- if .kvCacheMemory }}
kv_cache_memory: {{ .kvCacheMemory | quote }}
{{- else }}
kv_cache_blocks: {{ .kvCacheBlocks }}
{{- end }}
block_size: {{ .blockSize }}
max_model_len: {{ .maxModelLen }}
max_num_batched_tokens: {{ .maxNumBatchedTokens }}
redundant_experts: {{ .redundantExperts }}
{{- with .dtype }}
dtype: {{ . }}
{{- end }}
collective_timeout_s: {{ .collectiveTimeoutS }}
{{- end }}

{{/*
Fail early when a worker group cannot hold its pool: every group needs ep_size x gpus_per_rank GPUs.
Call with (dict "name" "prefill" "group" .Values.prefill).
*/}}
{{- define "k2serve.checkPool" -}}
{{- $pool := .group.pool }}
{{- if and (gt (float64 $pool.gpusPerRank) 0.0) (eq (int .group.gpusPerPod) 0) }}
{{- fail (printf "%s: pool.gpusPerRank is %v but gpusPerPod is 0" .name $pool.gpusPerRank) }}
{{- end }}
{{- $need := mulf $pool.groups $pool.epSize $pool.gpusPerRank }}
{{- $have := mulf .group.replicas .group.gpusPerPod }}
{{- if and (gt (float64 $pool.gpusPerRank) 0.0) (gt $need $have) }}
{{- fail (printf "%s: %v groups x epSize %v x gpusPerRank %v need %v GPUs; replicas x gpusPerPod give %v" .name $pool.groups $pool.epSize $pool.gpusPerRank $need $have) }}
{{- end }}
{{- if or (gt (int .group.minReplicas) (int .group.replicas)) (gt (int .group.replicas) (int .group.maxReplicas)) }}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas" .name) }}
{{- end }}
{{- end }}
