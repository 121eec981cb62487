{{/*
Pod-level fields shared by the Ray head and the worker groups. Call with (dict "ctx" $ "group" <values>),
plus "kubeApi" true for the head: with autoscaler.enabled its controller patches the RayCluster and
needs the ServiceAccount token; no other pod gets it.
*/}}
{{- define "k2serve.rayPodSpec" -}}
serviceAccountName: {{ include "k2serve.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ and (default false .kubeApi) .ctx.Values.autoscaler.enabled }}
terminationGracePeriodSeconds: {{ .group.terminationGracePeriodSeconds }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .group.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .group.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
One KubeRay worker group (one list item of workerGroupSpecs) for a pool: <name> is prefill or decode.
One pod per GPU node; its GPUs go to Ray with --num-gpus and to Kubernetes in requests and limits.
The container starts Ray itself (see the ray.io/overwrite-container-cmd comment in raycluster.yaml):
`exec ray start --address=<head>:<gcs> --block`, so the pod lives as long as its raylet.
Call with (dict "ctx" $ "name" "prefill" "group" .Values.prefill).
*/}}
{{- define "k2serve.rayWorkerGroup" -}}
{{- $ctx := .ctx }}
{{- $g := .group }}
{{- $gpu := int $g.gpusPerPod }}
{{- $params := dict }}
{{- range $k, $v := $g.rayStartParams }}{{ $_ := set $params $k (toString $v) }}{{- end }}
{{- $_ := set $params "node-manager-port" (toString $ctx.Values.ray.nodeManagerPort) }}
{{- $_ := set $params "num-gpus" (toString $gpu) -}}
- groupName: {{ .name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "k2serve.labels" (dict "ctx" $ctx "component" .name) | nindent 8 }}
        {{- with $g.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "k2serve.rayPodSpec" (dict "ctx" $ctx "group" $g) | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "k2serve.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args:
            - |-
              set -e
              ulimit -n 65536 || true
              exec ray start --address={{ include "k2serve.gcsAddress" $ctx }} --node-ip-address="$K2SERVE_HOST_IP" --block{{ include "k2serve.rayFlags" $params }}
          ports:
            - {name: raylet, containerPort: {{ $ctx.Values.ray.nodeManagerPort }}, protocol: TCP}
          env:
            {{- include "k2serve.rayEnv" $ctx | nindent 12 }}
            - {name: K2SERVE_WORKER_GRACE_S, value: {{ $g.graceS | quote }}}
            {{- with $g.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- $res := deepCopy (default dict $g.resources) }}
            {{- if gt $gpu 0 }}
            {{- $_ := set $res "limits" (merge (dict $ctx.Values.gpuResourceName (toString $gpu)) (default dict $res.limits)) }}
            {{- $_ := set $res "requests" (merge (dict $ctx.Values.gpuResourceName (toString $gpu)) (default dict $res.requests)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          # SIGTERM reaches `ray start`, which kills the ranks at once: first let each rank drain its group
          # (a rank drains on SIGTERM and the controller replaces the group), bounded by graceS + 25 s.
          lifecycle:
            preStop:
              exec:
                command:
                  - /bin/bash
                  - -c
                  - pkill -TERM -f 'ray::WorkerActor' || true; timeout {{ add (int $g.graceS) 25 }} bash -c 'while pgrep -f ray::WorkerActor >/dev/null; do sleep 1; done' || true
          # The raylet's port: open while this node is part of the Ray cluster.
          readinessProbe:
            tcpSocket: {port: raylet}
            {{- toYaml $g.readinessProbe | nindent 12 }}
          livenessProbe:
            tcpSocket: {port: raylet}
            {{- toYaml $g.livenessProbe | nindent 12 }}
          {{- with $g.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - {name: dshm, mountPath: /dev/shm}
            - {name: model, mountPath: /models, readOnly: true}
      volumes:
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: {{ $g.shmSize }}}
        {{- include "k2serve.modelVolume" $ctx | nindent 8 }}
{{- end }}

{{/*
Worker pods one expert-parallel group of a pool needs: ceil(epSize x gpusPerRank / gpusPerPod) on GPU
pods, 1 on CPU pods (autoscaler.kubernetes.pods_per_group of the cluster YAML). Call with <pool values>.
*/}}
{{- define "k2serve.podsPerGroup" -}}
{{- if and (gt (int .gpusPerPod) 0) (gt (float64 .pool.gpusPerRank) 0.0) }}
{{- ceil (divf (mulf .pool.epSize .pool.gpusPerRank) .gpusPerPod) | int }}
{{- else }}
{{- 1 }}
{{- end }}
{{- end }}

{{/*
A pool's worker-group values as rendered, written to .out[.name] (a template returns only text): the
values, except that with autoscaler.enabled minReplicas/maxReplicas are the autoscaler's min/max
groups x pods per group, so KubeRay's bounds and the autoscaler's agree.
Call with (dict "ctx" $ "name" "prefill" "out" $dict).
*/}}
{{- define "k2serve.workerGroupValues" -}}
{{- $g := deepCopy (index .ctx.Values .name) }}
{{- $a := .ctx.Values.autoscaler }}
{{- if $a.enabled }}
{{- $bounds := index $a.pools .name }}
{{- if gt (int $bounds.minGroups) (int $bounds.maxGroups) }}
{{- fail (printf "autoscaler.pools.%s: need minGroups <= maxGroups" .name) }}
{{- end }}
{{- if or (lt (int $g.pool.groups) (int $bounds.minGroups)) (gt (int $g.pool.groups) (int $bounds.maxGroups)) }}
{{- fail (printf "%s.pool.groups (%v) must lie in autoscaler.pools.%s [minGroups, maxGroups]" .name $g.pool.groups .name) }}
{{- end }}
{{- $pods := int (include "k2serve.podsPerGroup" $g) }}
{{- $_ := set $g "minReplicas" (mul $bounds.minGroups $pods) }}
{{- $_ := set $g "maxReplicas" (mul $bounds.maxGroups $pods) }}
{{- end }}
{{- $_ := set .out .name $g }}
{{- end }}
